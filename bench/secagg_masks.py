"""Cost of secure aggregation masks on a 1M-parameter update (median of several runs).

Run from the repository root: PYTHONPATH=. python bench/secagg_masks.py [--params 1000000] [--members 5] [--runs 7]
Prints a markdown table to paste into docs/benchmarks.md.
"""

import argparse
import os
import platform
import statistics
import time

import numpy as np

from fedcli import keys
from fedcli.secagg import masking


def _median_ms(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--members", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()

    fed, rnd, n = "bench-fed", 1, a.params
    x = np.random.default_rng(0).normal(0, 0.1, n)
    rows = []
    for m in a.members:
        members = [f"bank-{i:02d}" for i in range(m)]
        priv = {b: keys.generate_x25519() for b in members}
        roster = {b: k.public_key() for b, k in priv.items()}
        me = members[0]
        scale = masking.fixed_point_scale(1.0, m)
        q = masking.quantize(x, 1.0, scale)
        seed = masking.pair_seed(fed, rnd, me, priv[me], members[1], roster[members[1]])
        masked = {b: masking.mask_update(q, fed, rnd, b, priv[b], roster) for b in members}
        survivors = members[:-1]
        partial = masking.sum_masked(masked[b] for b in survivors)
        revealed = {
            (s, members[-1]): masking.pair_seed(fed, rnd, s, priv[s], members[-1], roster[members[-1]])
            for s in survivors
        }
        rows.append(
            (
                m,
                _median_ms(lambda: masking.pair_seed(fed, rnd, me, priv[me], members[1], roster[members[1]]), a.runs),
                _median_ms(lambda: masking.expand_mask(seed, n), a.runs),
                _median_ms(lambda: masking.quantize(x, 1.0, scale), a.runs),
                _median_ms(lambda: masking.mask_update(q, fed, rnd, me, priv[me], roster), a.runs),
                _median_ms(lambda: masking.sum_masked(masked.values()), a.runs),
                _median_ms(lambda: masking.unmask_sum(partial, survivors, revealed), a.runs),
            )
        )

    import cryptography

    print(
        f"Machine: {_cpu()}, {os.cpu_count()} CPU(s) visible, Python {platform.python_version()}, "
        f"numpy {np.__version__}, cryptography {cryptography.__version__}; "
        f"{n:,} parameters, median of {a.runs} runs, milliseconds.\n"
    )
    print(
        "| members | pair seed (X25519+HKDF) | one mask stream (AES-CTR) | quantize | mask one update | sum all masked | unmask, 1 dropped |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join([str(r[0])] + [f"{v:.2f}" for v in r[1:]]) + " |")


if __name__ == "__main__":
    main()
