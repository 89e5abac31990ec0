"""Long-run fuzzing: the properties of tests/test_fuzz.py, run for as many minutes as you give.

Each reader of untrusted bytes (spec, signed manifest + update check, safetensors, bundle
import) is fed fresh random and mutated inputs, in rounds of --chunk examples per target,
until the time is up. A crash is any exception other than a FedcliError, a call slower than
the time bound or a peak-memory jump; each one is printed with hypothesis' shrunk input.

    python bench/fuzz.py 10                # ten minutes, all targets
    python bench/fuzz.py 1 --targets bundle

Prints one line per round and a final JSON summary (inputs per target, crashes, minutes).
Exit code 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]

import test_fuzz
from common import machine
from hypothesis import HealthCheck, Phase, given, settings


def _body(world, check, seen: Counter):
    def body(data):
        seen["n"] += 1
        check(world, data)

    return body


def run(minutes: float, targets: list[str], chunk: int) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="fedcli-fuzz-"))
    try:
        return _run(test_fuzz.build_world(scratch), minutes, targets, chunk)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(world, minutes: float, targets: list[str], chunk: int) -> dict:
    inputs_run, crashes = Counter(), []
    start = time.monotonic()
    stop = start + minutes * 60
    while time.monotonic() < stop:
        for name in targets:
            if time.monotonic() >= stop:
                break
            make_inputs, check = test_fuzz.TARGETS[name]
            seen = Counter()
            test = settings(
                max_examples=chunk,
                deadline=None,
                database=None,
                derandomize=False,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate, Phase.shrink],
                report_multiple_bugs=False,
            )(given(make_inputs(world))(_body(world, check, seen)))
            try:
                test()
            except Exception as e:
                crashes.append(
                    {
                        "target": name,
                        "error": f"{type(e).__name__}: {str(e)[:2000]}",
                        "trace": traceback.format_exc()[-4000:],
                    }
                )
                print(f"CRASH in {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            inputs_run[name] += seen["n"]
        elapsed = (time.monotonic() - start) / 60
        print(f"{elapsed:6.1f} min  inputs {dict(inputs_run)}  crashes {len(crashes)}", flush=True)
    return {
        "minutes": round((time.monotonic() - start) / 60, 2),
        "inputs": dict(inputs_run),
        "total_inputs": sum(inputs_run.values()),
        "crashes": crashes,
        "machine": machine(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minutes", type=float, help="how long to fuzz")
    parser.add_argument("--targets", nargs="+", default=sorted(test_fuzz.TARGETS), choices=sorted(test_fuzz.TARGETS))
    parser.add_argument("--chunk", type=int, default=200, help="examples per target per round")
    args = parser.parse_args()
    summary = run(args.minutes, args.targets, args.chunk)
    print(json.dumps({k: v for k, v in summary.items() if k != "crashes"} | {"crashes": len(summary["crashes"])}))
    for c in summary["crashes"]:
        print(f"\n--- {c['target']}: {c['error']}\n{c['trace']}")
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
