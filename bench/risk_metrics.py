"""Cost of `fedcli evaluate`'s numbers with calibration and the credit views added: metrics.evaluation
at a baseline ref (before issue 15: ranking metrics and the threshold table) against this tree (plus
Brier, ECE, the reliability table, KS with its score, Gini and the score bands).

Each run is a fresh child process importing one copy of fedcli; peak is the RSS it added while
computing (above the labels and scores it holds). Runs alternate so load on a shared machine falls
on both alike; the table shows medians.

    python bench/risk_metrics.py --rows 1000000 10000000 --runs 5 [--baseline a986ca5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import PYTHON, ROOT, export_ref, machine, rss_mb


def table(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """30 % positives (the credit demo's rate) and float32 scores, as models.predict returns them."""
    rng = np.random.default_rng(0)
    y = (rng.random(rows) < 0.3).astype(np.float32)
    p = (1 / (1 + np.exp(-(rng.normal(size=rows) + 1.5 * y - 1)))).astype(np.float32)
    return y, p


def child(tree: str, rows: int) -> None:
    sys.path.insert(0, tree)
    from fedcli.metrics import evaluation

    y, p = table(rows)
    held, _ = rss_mb()
    t = time.perf_counter()
    ev = evaluation(y, p)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "added_mb": rss_mb()[1] - held, "auc": ev.metrics["auc"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", default="a986ca5")
    ap.add_argument("--child", nargs=2, metavar=("TREE", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": str(export_ref(args.baseline, Path(tmp))), "after": str(ROOT)}
        print(f"| rows | before ({args.baseline}) | after | added time | RSS added before / after |")
        print("|---:|---:|---:|---:|---:|")
        for rows in args.rows:
            runs: dict[str, list[dict]] = {k: [] for k in trees}
            for _ in range(args.runs):
                for which, tree in trees.items():
                    out = subprocess.run(
                        [PYTHON, __file__, "--child", tree, str(rows)],
                        capture_output=True,
                        text=True,
                        check=True,
                        cwd="/",
                    )
                    runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
            assert abs(runs["before"][0]["auc"] - runs["after"][0]["auc"]) < 1e-12, "the two disagree"
            t = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
            mb = {k: statistics.median(r["added_mb"] for r in v) for k, v in runs.items()}
            print(
                f"| {rows:,} | {t['before']:.2f} s | {t['after']:.2f} s | {t['after'] - t['before']:+.2f} s "
                f"| {mb['before']:.0f} / {mb['after']:.0f} MB |"
            )


if __name__ == "__main__":
    main()
