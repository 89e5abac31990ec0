"""Run by bench/aggregate.py inside bench/.venv-flwr: Flower's weighted average of the same updates.

flwr_child.py STORE update1.safetensors ...   -> one JSON line: load_s, aggregate_s, base_mb, peak_mb
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from common import rss_mb
from flwr.server.strategy.aggregate import aggregate
from safetensors.numpy import load_file


def main(files: list[Path]) -> dict:
    base, _ = rss_mb()
    t = time.perf_counter()
    results = []
    for f in files:
        tensors = load_file(f)
        n = json.loads(f.with_suffix(".json").read_text())["num_examples"]
        results.append(([tensors[k] for k in sorted(tensors)], n))
    load_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    mean = aggregate(results)
    aggregate_s, cpu = time.perf_counter() - t, time.process_time() - cpu
    _, peak = rss_mb()
    assert all(np.isfinite(a).all() for a in mean)
    return {"load_s": load_s, "aggregate_s": aggregate_s, "cpu_s": cpu, "base_mb": base, "peak_mb": peak}


if __name__ == "__main__":
    print(json.dumps(main([Path(a) for a in sys.argv[2:]])))
