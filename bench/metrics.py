"""Cost of scoring a bank's table: fedcli.metrics.score against the scikit-learn calls it replaced.

A bank's step scores twice per round (the global model before, the trained one after) on every row
it trains on, and `fedcli evaluate` once on its table: at 10 million rows that cost is part of the
issue's 2-minute budget. Baseline: what score() did before (roc_auc_score, average_precision_score
and roc_curve for KS: three sorts). New: score() (two plain sorts, and more metrics). Each run is a
fresh child process; peak is the RSS it added while scoring (above the labels and scores it holds).

    python bench/metrics.py --rows 1000000 10000000 --runs 5
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from common import PYTHON, ROOT, machine, rss_mb


def old_score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """fedcli.metrics.score as it was before issue 14 (git show fabdc08:fedcli/metrics.py)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    return {
        "auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "ks": float(np.max(tpr - fpr)),
    }


def table(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """0.2 % positives (card fraud's rate) and float32 scores, as models.predict returns them."""
    rng = np.random.default_rng(0)
    y = (rng.random(rows) < 0.002).astype(np.float32)
    p = (1 / (1 + np.exp(-(rng.normal(size=rows) + 3 * y)))).astype(np.float32)
    return y, p


def child(which: str, rows: int) -> None:
    y, p = table(rows)
    if which == "old":
        import sklearn.metrics  # noqa: F401  (the import is not what is timed)
    else:
        import fedcli.metrics  # noqa: F401
    held, _ = rss_mb()
    t = time.perf_counter()
    got = old_score(y, p) if which == "old" else __import__("fedcli.metrics").metrics.score(y, p)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "added_mb": rss_mb()[1] - held, "auc": got["auc"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(machine())
    print(
        "| rows | before: scikit-learn, 3 metrics | after: score(), 7 metrics | speed-up | RSS added before / after |"
    )
    print("|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for _ in range(args.runs):  # alternate, so load on the shared machine falls on both alike
            for which in runs:
                out = subprocess.run(
                    [PYTHON, __file__, "--child", which, str(rows)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=True,
                )
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert abs(runs["old"][0]["auc"] - runs["new"][0]["auc"]) < 1e-9, "the two disagree"
        t = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        mb = {k: statistics.median(r["added_mb"] for r in v) for k, v in runs.items()}
        print(
            f"| {rows:,} | {t['old']:.2f} s | {t['new']:.2f} s | {t['old'] / t['new']:.1f}x "
            f"| {mb['old']:.0f} / {mb['new']:.0f} MB |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
