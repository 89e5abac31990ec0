"""What the holdout costs a bank per round, and how close the binned metrics are to the exact ones.

For N rows x F float32 features (simulated, standard normal) and scores with a known signal:

  split      bank.holdout.holdout_rows: the keyed hash of every row (one pass per feature column)
  histogram  protocol.binned.Histogram.of on the held-out rows' scores
  metrics    Histogram.metrics (AUC, KS, PR-AUC, Brier, ECE from the bins)

and the gap between the binned AUC / KS / PR-AUC and metrics.score on the same rows. Median of
--runs runs each (wall clock, one process).

    python bench/holdout.py --rows 1e5,1e6 --features 30 --runs 5
"""

import argparse
import statistics
import time

import numpy as np

from fedcli.bank.holdout import holdout_rows
from fedcli.metrics import score
from fedcli.protocol.binned import Histogram


def _median(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e5,1e6")
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--share", type=float, default=0.2)
    ap.add_argument("--bins", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0.05, help="positive rate")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("rows | features | split s | histogram s | metrics s | held out | AUC gap | KS gap | PR-AUC gap")
    for n in (int(float(x)) for x in args.rows.split(",")):
        X = rng.normal(size=(n, args.features)).astype(np.float32)
        y = (rng.random(n) < args.rate).astype(np.float32)
        p = 1 / (1 + np.exp(-(rng.normal(-3, 1.2, n) + 1.8 * y)))
        t_split, held = _median(lambda X=X: holdout_rows("bench", X, args.share), args.runs)
        t_hist, hist = _median(lambda: Histogram.of(y[held], p[held], args.bins), args.runs)
        t_metrics, binned = _median(hist.metrics, args.runs)
        exact = score(y[held], p[held])
        gaps = " | ".join(f"{binned[k] - exact[k]:+.4f}" for k in ("auc", "ks", "pr_auc"))
        print(f"{n:,} | {args.features} | {t_split:.3f} | {t_hist:.3f} | {t_metrics:.4f} | {held.mean():.3f} | {gaps}")


if __name__ == "__main__":
    main()
