"""What `[training] pos_weight` does on the simulated fraud data: holdout ranking and score level.

The fraud demo's data (examples/fraud/simulate.py --customers 1000 --terminals 2000 --days 120
--seed 0), the four banks' training rows pooled, the demo spec's model and hyper-parameters
(logistic regression, 5 epochs, batch 64, Adam lr 1e-3), trained with fedcli.bank.training.fit
for each pos_weight and seed; scored on the untouched holdout (the last 30 days).

    python bench/pos_weight.py --weights 1,10,115 --seeds 3
"""

import argparse
import statistics
import sys
import tomllib

import numpy as np
from common import ROOT, machine


def load():
    sys.path.insert(0, str(ROOT / "examples" / "fraud"))
    import simulate

    from fedcli.bank.tables import prepare
    from fedcli.protocol.spec import DataSpec, NumericFeature

    raw = tomllib.loads((ROOT / "examples" / "fraud" / "federation.toml").read_text())
    spec = DataSpec(
        raw["data"]["target"], raw["data"]["positive"], tuple(NumericFeature(**f) for f in raw["data"]["numeric"]), ()
    )
    frame = simulate.simulate(1000, 2000, 120, 4, np.random.default_rng(0))
    parts = simulate.split(frame, 120, 4, 30)
    pool = np.concatenate([parts[b] for b in simulate.bank_names(4)])
    train, test = prepare(frame.iloc[pool], spec, "train"), prepare(frame.iloc[parts["test"]], spec, "holdout")
    return train, test, raw["training"]


def recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float) -> float:
    """Share of frauds scored above the threshold that flags `fpr` of the genuine rows."""
    threshold = np.quantile(s[y == 0], 1 - fpr)
    return float((s[y == 1] > threshold).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="1,10,115")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fedcli import models
    from fedcli.bank.kernel import probabilities
    from fedcli.bank.training import fit
    from fedcli.metrics import score
    from fedcli.protocol.spec import ModelSpec, TrainingSpec

    train, test, t = load()
    rate = float(train.y.mean())
    print(machine())
    print(
        f"{len(train.y):,} training rows ({rate:.2%} fraud, negatives/positives {(1 - rate) / rate:.0f}), "
        f"holdout {len(test.y):,} rows ({test.y.mean():.2%} fraud); seeds 0..{args.seeds - 1}, median"
    )
    print(
        "| pos_weight | AUC | PR-AUC | recall at 0.1% FPR | recall at 1% FPR | mean score, frauds | mean score, genuine |"
    )
    print("|---|---|---|---|---|---|---|")
    ms = ModelSpec("logreg", (), seed=42)
    start = models.initial(ms, train.X.shape[1])
    for w in (float(x) for x in args.weights.split(",")):
        training = TrainingSpec(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], pos_weight=w)
        rows = []
        for seed in range(args.seeds):
            weights, _ = fit(ms, training, start, train.X, train.y, seed=seed)
            s = probabilities(ms, weights, test.X)
            sc = score(test.y, s)
            rows.append(
                (
                    sc["auc"],
                    sc["pr_auc"],
                    recall_at_fpr(test.y, s, 0.001),
                    recall_at_fpr(test.y, s, 0.01),
                    float(s[test.y == 1].mean()),
                    float(s[test.y == 0].mean()),
                )
            )
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(f"| {w:g} | " + " | ".join(f"{v:.4f}" for v in med) + " |", flush=True)


if __name__ == "__main__":
    main()
