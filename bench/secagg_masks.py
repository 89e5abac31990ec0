"""Cost of secure aggregation masks on a 1M-parameter update (median of several runs).

Run from the repository root: PYTHONPATH=. python bench/secagg_masks.py [--params 1000000] [--members 5] [--runs 7]
Prints a markdown table to paste into docs/benchmarks.md.

With --cost: the whole per-round protocol cost of double masking, per bank and for the coordinator,
with 0, 1 and n - t dropped banks (t = max(3, n // 2 + 1)), through the functions `fedcli train`
and `fedcli aggregate` run (secagg.exchange): ms and bytes.
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


class _Member:
    """The two attributes of a spec member that secure aggregation reads."""

    def __init__(self, name, key):
        self.name, self._key = name, key

    def mask_key(self):
        return self._key


def _spec(members, roster):
    from types import SimpleNamespace

    t = max(3, len(members) // 2 + 1)
    secagg = SimpleNamespace(clip=1.0, noise="full", threshold=t, enabled=True)
    return SimpleNamespace(
        federation_id="bench-fed", secagg=secagg, min_clients=t, members=[_Member(b, roster[b]) for b in members]
    )


def _cost_row(m, n, runs, x):
    """(members, t, dropped, bank mask ms, update bytes, manifest record bytes, reveal ms, recovery bytes,
    coordinator unmask ms) for each dropout count."""
    import json

    from fedcli.protocol import tensors
    from fedcli.secagg import exchange, pairshares, sharing

    members = [f"bank-{i:02d}" for i in range(m)]
    priv = {b: keys.generate_x25519() for b in members}
    roster = {b: k.public_key() for b, k in priv.items()}
    spec, base, me = _spec(members, roster), "ab" * 32, members[0]
    t = spec.secagg.threshold
    delta = {"w": x}
    masked, record, _, pair_file = exchange.mask_delta(spec, 1, me, priv[me], delta, base)
    mask_ms = _median_ms(lambda: exchange.mask_delta(spec, 1, me, priv[me], delta, base), runs)
    update_bytes = len(tensors.encode(masked))
    record_bytes = len(json.dumps(record, separators=(",", ":")))
    t_pair = exchange.pair_threshold(spec)
    rows = []
    for dropped_n in sorted({0, 1, m - t}):
        survivors, dropped = members[: m - dropped_n], members[m - dropped_n :]
        dealt = {s: exchange.mask_delta(spec, 1, s, priv[s], delta, base) for s in survivors}
        records = {s: v[1] for s, v in dealt.items()}
        files = {s: v[3] for s, v in dealt.items()}

        def reveal():
            shares = {}
            for s in survivors:
                ctx = sharing.share_context("bench-fed", 1, s, me, base)
                shares[s] = keys.b64(
                    sharing.open_sealed(keys.unb64(records[s]["shares"][me]), priv[me], roster[s], ctx)
                )
            seeds = masking.recovery_seeds("bench-fed", 1, me, priv[me], roster, dropped, base)
            pair_shares = {}
            for s in survivors if dropped else []:
                mine = pairshares.open_box(files[s], "bench-fed", 1, s, me, priv[me], roster, base)
                pair_shares[s] = {d: keys.b64(mine[d]) for d in dropped}
            return {
                "self_shares": shares,
                "seeds": {d: keys.b64(v) for d, v in seeds.items()},
                "pair_shares": pair_shares,
            }

        recovery_bytes = len(json.dumps(reveal(), separators=(",", ":"))) + 400  # + header fields and signature
        total = np.zeros(n, dtype=np.uint32)
        pairs = {
            (s, d): masking.pair_seed("bench-fed", 1, s, priv[s], d, roster[d], base)
            for s in survivors
            for d in dropped
        }
        seeds = {s: bytes([i]) * 16 for i, s in enumerate(survivors)}
        # the worst case: no survivor revealed its own seeds, every (survivor, dropped) seed is rebuilt from
        # t_pair revealed shares and checked against its commitment
        holders = survivors[:t_pair]
        opened = {
            (s, h): pairshares.open_box(files[s], "bench-fed", 1, s, h, priv[h], roster, base)
            for s in survivors
            if dropped
            for h in holders
        }
        points = {
            (s, d): [(pairshares.x_of(h, members), pairshares.decode_element(opened[(s, h)][d])) for h in holders]
            for s in survivors
            for d in dropped
        }

        def unmask():
            rebuilt = {
                p: exchange.rebuild_pair_seed(p, pts, t_pair, records[p[0]]["commitments"][p[1]])
                for p, pts in points.items()
            }
            assert rebuilt == pairs
            out = masking.unmask_sum(total, survivors, rebuilt)
            for s in survivors:
                masking.remove_self_mask(out, seeds[s])
            return out

        rows.append(
            (
                m,
                t,
                dropped_n,
                mask_ms,
                update_bytes,
                record_bytes,
                len(pair_file),
                _median_ms(reveal, runs),
                recovery_bytes,
                _median_ms(unmask, max(1, runs // 2)),
            )
        )
    return rows


def cost(a, x):
    import cryptography

    print(
        f"Machine: {_cpu()}, {os.cpu_count()} CPU(s) visible, Python {platform.python_version()}, "
        f"numpy {np.__version__}, cryptography {cryptography.__version__}; "
        f"{a.params:,} parameters, median of {a.runs} runs.\n"
    )
    print(
        "| banks | t | dropped | bank: mask + deal shares (ms) | bank: update file (bytes) | bank: manifest `secagg` "
        "(bytes) | bank: pair-shares file (bytes) | bank: reveal (ms) | bank: recovery file (bytes) "
        "| coordinator: rebuild seeds + unmask (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in a.members:
        for r in _cost_row(m, a.params, a.runs, x):
            print(
                f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:,} | {r[5]:,} | {r[6]:,} | {r[7]:.1f} | {r[8]:,} "
                f"| {r[9]:.0f} |"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--members", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cost", action="store_true", help="whole-protocol cost per bank and round (double masking)")
    a = ap.parse_args()
    if a.cost:
        cost(a, np.random.default_rng(0).normal(0, 0.1, a.params))
        return

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
