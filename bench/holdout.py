"""What the holdout costs a bank per round, and how close the binned metrics are to the exact ones.

For N rows x F float32 features (simulated, standard normal) and scores with a known signal:

  split      bank.holdout.holdout_rows: the keyed hash of every row (one pass per feature column)
  histogram  protocol.binned.Histogram.of on the held-out rows' scores
  metrics    Histogram.metrics (AUC, KS, PR-AUC, Brier, ECE from the bins)

and the gap between the binned AUC / KS / PR-AUC and metrics.score on the same rows. Median of
--runs runs each (wall clock, one process).

    python bench/holdout.py --rows 1e5,1e6 --features 30 --runs 5

--dp: under [privacy] each bank publishes its counts with Gaussian noise (std = [evaluation] noise,
binned.noised) and readers sum them, clip negatives keeping the total and round
(Histogram.from_noised). For B banks of R holdout rows each (simulated scores, positive rate
--rate), over --draws fresh noise draws: how far the federation's noised AUC / KS / Brier / ECE are
from the exact metrics of the same rows (median and 95th percentile of |gap|, over the draws where the metric is defined).

    python bench/holdout.py --dp --banks 4 --bank-rows 220,2000,20000 --noise 2,5,10 --bins 20,50 --rate 0.22
"""

import argparse
import statistics
import time

import numpy as np

from fedcli.bank.holdout import holdout_rows
from fedcli.metrics import score
from fedcli.protocol.binned import Histogram, noised


def _median(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _dp_gaps(args) -> None:
    """The federation's noised-bin metrics against the exact ones, per (bank rows, noise, bins)."""
    rng = np.random.default_rng(1)
    keys = ("auc", "ks", "brier", "ece")
    print(
        "banks | rows per bank | noise | bins | exact AUC | "
        + " | ".join(f"|{k} gap| median / p95" for k in keys)
        + " | AUC undefined"
    )
    for rows in (int(float(x)) for x in args.bank_rows.split(",")):
        y = [(rng.random(rows) < args.rate).astype(np.float32) for _ in range(args.banks)]
        p = [1 / (1 + np.exp(-(rng.normal(-1.8, 1.0, rows) + 1.6 * yb))) for yb in y]
        yy, pp = np.concatenate(y), np.concatenate(p)
        exact = score(yy, pp) | {"brier": float(np.mean((pp - yy) ** 2))}
        for z in (float(x) for x in args.noise.split(",")):
            for bins in (int(x) for x in args.bins_dp.split(",")):
                exact["ece"] = Histogram.of(yy, pp, bins).metrics()["ece"]
                parts = [Histogram.of(yb, pb, bins) for yb, pb in zip(y, p, strict=True)]
                gaps: dict[str, list[float]] = {k: [] for k in keys}
                for _ in range(args.draws):
                    sent = [noised(h.negatives, h.positives, z, rng) for h in parts]
                    fed = Histogram.from_noised(
                        np.sum([s["negatives"] for s in sent], axis=0), np.sum([s["positives"] for s in sent], axis=0)
                    ).metrics()
                    for k in keys:
                        gaps[k].append(abs(fed[k] - exact[k]))
                undefined = sum(1 for g in gaps["auc"] if g != g) / args.draws  # NaN: no positive (or negative) left
                cells = " | ".join(f"{np.nanmedian(gaps[k]):.3f} / {np.nanpercentile(gaps[k], 95):.3f}" for k in keys)
                print(f"{args.banks} | {rows:,} | {z:g} | {bins} | {exact['auc']:.3f} | {cells} | {undefined:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1e5,1e6")
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--share", type=float, default=0.2)
    ap.add_argument("--bins", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0.05, help="positive rate")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dp", action="store_true", help="noised counts against exact metrics (see above)")
    ap.add_argument("--banks", type=int, default=4)
    ap.add_argument("--bank-rows", default="220,2000,20000")
    ap.add_argument("--noise", default="2,5,10")
    ap.add_argument("--bins-dp", default="20,50")
    ap.add_argument("--draws", type=int, default=200)
    args = ap.parse_args()
    if args.dp:
        _dp_gaps(args)
        return
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
