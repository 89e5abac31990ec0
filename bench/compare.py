"""Federated vs pooled vs each bank alone, on credit and on fraud, same holdout (not a test).

For each data set and each seed:

* federated: the real CLI (`fedcli keygen`, `init`, then R rounds of `train` at every bank and
  `aggregate`), run as `python -m fedcli.cli` with this tree on PYTHONPATH, on a folder store;
  the global model of every round is verified and scored on the holdout;
* pooled: the same model family and local loop (`fedcli.bank.training.fit`, the signed spec's
  training settings) on all banks' rows together, from the same round-0 weights, for the same
  total epochs (rounds x epochs);
* each bank alone: the same loop, start and total epochs on that bank's rows only;
* references, once (deterministic): a converged scikit-learn LogisticRegression (lbfgs, default
  L2, the spec's preprocessing) on the pooled rows and on each bank's rows.

The seed moves the training randomness: round-0 weights ([model] seed), the federation id (which
seeds every bank's shuffling in `fedcli train`) and the shuffling seed of the pooled and local
runs. Prints markdown tables for docs/benchmarks.md (mean and sample standard deviation over
seeds): holdout AUC and PR-AUC, the loss on all banks' rows (the objective pooled training
minimises), a paired-bootstrap interval of AUC(federated) - AUC(pooled) over holdout rows (what
the holdout can resolve), and for logistic regression the weights where federated and pooled
differ most. With --json, writes every number.

    python bench/compare.py [--seeds 3] [--credit-rounds 5] [--fraud-rounds 3]
        [--credit-epochs N] [--fraud-epochs N] [--customers 1000 --terminals 2000 --days 120]
        [--only credit|fraud] [--quick] [--json out.json]
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "bench")]

import numpy as np
from common import PYTHON, machine
from prepare_credit import BANKS
from prepare_credit import split as split_credit

from fedcli import keys, models
from fedcli.bank import tables
from fedcli.bank.training import fit
from fedcli.metrics import score
from fedcli.protocol import rounds as store_rounds
from fedcli.protocol.spec import DataSpec, Spec, dumps
from fedcli.store import open_store

TEMPLATES = {"credit": ROOT / "examples" / "federation.toml", "fraud": ROOT / "examples" / "fraud" / "federation.toml"}


# --------------------------------------------------------------------------- data and spec


def prepare_data(name: str, out: Path, args: argparse.Namespace) -> dict:
    """Write bank-*.csv and test.csv into out; return the spec template (a dict) for that data."""
    raw = tomllib.loads(TEMPLATES[name].read_text())
    if name == "credit":
        split_credit(out)
        return raw
    simulate = ROOT / "examples" / "fraud" / "simulate.py"
    sizes = ["--customers", str(args.customers), "--terminals", str(args.terminals), "--days", str(args.days)]
    subprocess.run([PYTHON, str(simulate), "--out", str(out), *sizes, "--seed", "0"], check=True, capture_output=True)
    # Redraft the means and stds as `fedcli schema data/bank-a.csv` would: the template's were drafted at the
    # demo's sizes (identical there), and counts per window grow with the size.
    section, _ = tables.infer_schema(tables.read_table(out / "bank-a.csv"), "is_fraud", "1")
    raw["data"] = {k: v for k, v in section.items() if v != []}
    return raw


def cli(*argv: str, cwd: Path) -> None:
    """One fedcli command through the real CLI of this tree; a failure stops the benchmark with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([PYTHON, "-m", "fedcli.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"fedcli {' '.join(argv[:2])} exited {res.returncode}: {res.stderr.strip()[-2000:]}")


def federate(work: Path, data: Path, template: dict, fed_id: str, seed: int, n_rounds: int) -> None:
    """keygen, init, then n_rounds of train at every bank and aggregate, all through the CLI, in work/."""
    raw = {**template, "model": {**template["model"], "seed": template["model"].get("seed", 0) + seed}}
    (work / "federation.toml").write_bytes(dumps(raw))
    cli("keygen", "coordinator", "--out", "coordinator", cwd=work)
    for b in BANKS:
        cli("keygen", b, "--out", b, cwd=work)
    members = [arg for b in BANKS for arg in ("--member", f"{b}/{b}.pub")]
    cli(
        "init",
        "store",
        "--spec",
        "federation.toml",
        "--key",
        "coordinator/coordinator.key",
        "--id",
        fed_id,
        *members,
        cwd=work,
    )
    for _ in range(n_rounds):
        for b in BANKS:
            bank = (
                "--key",
                f"{b}/{b}.key",
                "--data",
                str(data / f"{b}.csv"),
                "--coordinator",
                "coordinator/coordinator.pub",
            )
            cli("train", "--store", "store", *bank, cwd=work)
        cli("aggregate", "--store", "store", "--key", "coordinator/coordinator.key", cwd=work)


# --------------------------------------------------------------------------- scoring


class Rows(NamedTuple):
    X: np.ndarray
    y: np.ndarray


def load_tables(data: Path, spec: DataSpec) -> tuple[dict[str, Rows], Rows]:
    """Every bank's rows and the holdout, through the same preprocessing `fedcli train` and `evaluate` use."""

    def load(name: str) -> Rows:
        prepared = tables.prepare(tables.read_table(data / f"{name}.csv"), spec, f"{name}.csv")
        return Rows(prepared.X, prepared.labels())

    return {b: load(b) for b in BANKS}, load("test")


class Scorer:
    """Scores weights on the holdout (as `fedcli evaluate` does) and on the pooled training objective."""

    def __init__(self, spec: Spec, banks: dict[str, Rows], test: Rows) -> None:
        self.spec, self.test = spec, test
        self.X = np.concatenate([t.X for t in banks.values()])
        self.y = np.concatenate([t.y for t in banks.values()])
        self.scores: dict[str, np.ndarray] = {}  # holdout scores kept for the paired bootstrap

    def __call__(self, name: str, weights: dict) -> dict[str, float]:
        p = models.predict(self.spec.model, weights, self.test.X)
        self.scores[name] = p
        m = score(self.test.y, p)
        return {"auc": m["auc"], "pr_auc": m["pr_auc"], "train_loss": self.train_loss(weights)}

    def train_loss(self, weights: dict) -> float:
        """Mean BCE on all banks' rows: the objective pooled training minimises (and FedAvg aims at)."""
        import torch

        model = models.load_arrays(models.build(self.spec.model, self.X.shape[1]), weights).eval()
        with torch.no_grad():
            z = model(torch.from_numpy(self.X)).squeeze(1).double().numpy()
        return float(np.mean(np.logaddexp(0.0, z) - self.y * z))

    def auc_gap_interval(self, a: str, b: str, resamples: int = 500) -> tuple[float, float]:
        """95% paired-bootstrap interval of AUC(a) - AUC(b) over holdout rows: what the holdout's size resolves."""
        from sklearn.metrics import roc_auc_score

        y, pa, pb = self.test.y, self.scores[a], self.scores[b]
        rng = np.random.default_rng(0)
        gaps = []
        for _ in range(resamples):
            i = rng.integers(0, len(y), len(y))
            if 0 < y[i].sum() < len(i):
                gaps.append(roc_auc_score(y[i], pa[i]) - roc_auc_score(y[i], pb[i]))
        lo, hi = np.quantile(gaps, [0.025, 0.975])
        return float(lo), float(hi)


def score_run(work: Path, data: Path, seed: int, n_rounds: int) -> tuple[dict, DataSpec]:
    """Holdout metrics of the federated model of every round, the pooled model and each bank alone.

    Also returns the signed spec's [data] section, for the converged references."""
    store = open_store(str(work / "store"))
    spec, spec_sha = store_rounds.load_spec(store, keys.load_public(work / "coordinator" / "coordinator.pub"))
    shapes = models.shapes(spec.model, spec.data.n_features)
    banks, test = load_tables(data, spec.data)
    scorer = Scorer(spec, banks, test)
    globals_ = [store_rounds.load_global(store, spec, spec_sha, r, shapes).tensors for r in range(n_rounds + 1)]
    by_round = [scorer("federated", g) for g in globals_[1:]]
    res: dict = {"federated": by_round[-1], "federated_by_round": by_round}
    pooled = local_fit(spec, n_rounds, globals_[0], scorer.X, scorer.y, seed)
    res["pooled"] = scorer("pooled", pooled)
    if spec.model.kind == "logreg":  # one weight per input feature: where the two models differ
        res["weights"] = {
            "federated": globals_[-1]["0.weight"].ravel().tolist(),
            "pooled": pooled["0.weight"].ravel().tolist(),
        }
    start = globals_[0]
    for b, t in banks.items():
        res[f"{b} alone"] = scorer(f"{b} alone", local_fit(spec, n_rounds, start, t.X, t.y, seed))
    res["gap_interval"] = scorer.auc_gap_interval("federated", "pooled")
    return res, spec.data


def local_fit(spec: Spec, n_rounds: int, start: dict, X: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """The bank's own loop with the signed spec's settings, for as many epochs as the federation ran in total."""
    total = dataclasses.replace(spec.training, epochs=spec.training.epochs * n_rounds)
    return fit(spec.model, total, start, X, y, seed=seed)[0]


def converged(data: Path, spec: DataSpec) -> dict[str, dict]:
    """scikit-learn LogisticRegression to convergence (lbfgs, C=1) on the spec's preprocessing: the upper reference."""
    from sklearn.linear_model import LogisticRegression

    banks, test = load_tables(data, spec)
    sets = {"pooled": (np.concatenate([t.X for t in banks.values()]), np.concatenate([t.y for t in banks.values()]))}
    sets.update({f"{b} alone": (t.X, t.y) for b, t in banks.items()})
    out = {}
    for name, (X, y) in sets.items():
        lr = LogisticRegression(max_iter=10_000).fit(X.astype(np.float64), y)
        m = score(test.y, lr.decision_function(test.X.astype(np.float64)))
        z = lr.decision_function(sets["pooled"][0].astype(np.float64))
        loss = float(np.mean(np.logaddexp(0.0, z) - sets["pooled"][1] * z))
        out[name] = {"auc": m["auc"], "pr_auc": m["pr_auc"], "train_loss": loss, "rows": len(y)}
        out[name]["weights"] = lr.coef_.ravel().tolist()
    out["test"] = {"rows": len(test.y), "positives": int(test.y.sum())}
    return out


# --------------------------------------------------------------------------- one data set


def run_dataset(name: str, args: argparse.Namespace, n_rounds: int) -> dict:
    """Every seed's federation and baselines on one data set, plus the converged references."""
    with tempfile.TemporaryDirectory(prefix=f"fedcli-compare-{name}-") as tmp:
        data = Path(tmp) / "data"
        template = prepare_data(name, data, args)
        epochs = getattr(args, f"{name}_epochs")
        if epochs:  # local epochs per round, instead of the template's
            template["training"] = {**template["training"], "epochs": epochs}
        if args.server_lr and name in args.server_lr_for:  # FedAvg with a server learning rate (Reddi et al. 2021)
            template["strategy"] = {"server": {"optimizer": "fedavg", "lr": args.server_lr}}
        runs, data_spec = [], None
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            work = Path(tmp) / f"seed{seed}"
            work.mkdir()
            federate(work, data, template, f"compare-{name}-seed{seed}", seed, n_rounds)
            t1 = time.perf_counter()
            res, data_spec = score_run(work, data, seed, n_rounds)
            res["seconds"] = {"federated": t1 - t0, "baselines": time.perf_counter() - t1}
            runs.append(res)
            fed, pooled = res["federated"]["auc"], res["pooled"]["auc"]
            print(
                f"{name} seed {seed}: federated AUC {fed:.4f}, pooled {pooled:.4f} ({t1 - t0:.0f} s + {res['seconds']['baselines']:.0f} s)",
                file=sys.stderr,
            )
        assert data_spec is not None
        refs = converged(data, data_spec)
    training = template["training"]
    features = tables.feature_names(data_spec)
    return {
        "name": name,
        "rounds": n_rounds,
        "training": training,
        "runs": runs,
        "converged": refs,
        "features": features,
    }


# --------------------------------------------------------------------------- tables


def spread(values: list[float], digits: int = 4) -> str:
    """mean ± sample standard deviation (just the value for one run)."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


HEADER = (
    "| model | training rows | AUC | PR-AUC | AUC - pooled | loss on all training rows "
    "| converged LR: AUC | PR-AUC | loss |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown(result: dict) -> str:
    runs, refs, n_rounds = result["runs"], result["converged"], result["rounds"]
    epochs = result["training"]["epochs"] * n_rounds
    labels = {"federated": f"federated, {n_rounds} rounds x {result['training']['epochs']} epochs (CLI)"}
    labels["pooled"] = f"pooled, {epochs} epochs (same loop)"
    labels.update({f"{b} alone": f"{b} alone, {epochs} epochs" for b in BANKS})
    lines = [HEADER]
    for key, label in labels.items():
        values = {m: [r[key][m] for r in runs] for m in ("auc", "pr_auc", "train_loss")}
        gap = spread([r[key]["auc"] - r["pooled"]["auc"] for r in runs]) if key != "pooled" else ""
        ref = refs.get(key, refs["pooled"])
        conv = (
            "| | | |" if key == "federated" else f"| {ref['auc']:.4f} | {ref['pr_auc']:.4f} | {ref['train_loss']:.5f} |"
        )
        lines.append(
            f"| {label} | {ref['rows']:,} | {spread(values['auc'])} | {spread(values['pr_auc'])} | {gap} "
            f"| {spread(values['train_loss'], 5)} {conv}"
        )
    by_round = [statistics.mean(r["federated_by_round"][i]["auc"] for r in runs) for i in range(n_rounds)]
    lines.append("")
    lines.append(
        "Federated AUC after each round (mean over seeds): "
        + ", ".join(f"r{i + 1} {a:.4f}" for i, a in enumerate(by_round))
    )
    return "\n".join(lines)


def verdict(result: dict) -> str:
    """The issue's goal, checked seed by seed: within 0.005 AUC of pooled, and above every bank alone."""
    runs = result["runs"]
    gaps = [r["federated"]["auc"] - r["pooled"]["auc"] for r in runs]
    within = sum(abs(g) <= 0.005 for g in gaps)
    above = {b: sum(r["federated"]["auc"] > r[f"{b} alone"]["auc"] for r in runs) for b in BANKS}
    intervals = ", ".join(f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in (r["gap_interval"] for r in runs))
    return (
        f"{result['name']}: federated - pooled AUC per seed {', '.join(f'{g:+.4f}' for g in gaps)} "
        f"(within 0.005 in {within} of {len(runs)}; 95% paired bootstrap over holdout rows {intervals}); "
        "federated above bank alone in " + ", ".join(f"{b} {n}/{len(runs)}" for b, n in above.items())
    )


def weights_table(result: dict, top: int = 6) -> str:
    """Logistic regression only: the features whose weights differ most between federated and pooled (seed mean)."""
    runs = [r for r in result["runs"] if "weights" in r]
    if not runs:
        return ""
    fed = np.mean([r["weights"]["federated"] for r in runs], axis=0)
    pooled = np.mean([r["weights"]["pooled"] for r in runs], axis=0)
    conv = result["converged"]["pooled"]["weights"]
    lines = [
        f"Largest weight differences, federated vs pooled (standardised inputs, mean over {len(runs)} seeds):",
        "",
        "| feature | federated | pooled | converged LR |",
        "|---|---:|---:|---:|",
    ]
    for j in np.argsort(-np.abs(pooled - fed))[:top]:
        lines.append(f"| `{result['features'][j]}` | {fed[j]:+.3f} | {pooled[j]:+.3f} | {conv[j]:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per data set (default 3)")
    ap.add_argument("--credit-rounds", type=int, default=5, help="rounds on credit (default 5, as the demo)")
    ap.add_argument("--fraud-rounds", type=int, default=3, help="rounds on fraud (default 3, as the fraud demo)")
    ap.add_argument("--credit-epochs", type=int, help="local epochs per round on credit (default: the template's, 3)")
    ap.add_argument("--fraud-epochs", type=int, help="local epochs per round on fraud (default: the template's, 5)")
    ap.add_argument("--customers", type=int, default=1000, help="fraud simulator: cards (default 1000, the demo's)")
    ap.add_argument("--terminals", type=int, default=2000, help="fraud simulator: terminals (default 2000)")
    ap.add_argument("--days", type=int, default=120, help="fraud simulator: days (default 120)")
    ap.add_argument("--only", choices=("credit", "fraud"), help="run one data set")
    ap.add_argument("--server-lr", type=float, help="[strategy.server] fedavg lr for the federations (default: template's)")
    ap.add_argument("--server-lr-for", default="credit,fraud", help="data sets --server-lr applies to (default both)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 rounds, a small fraud table")
    ap.add_argument("--json", type=Path, help="also write every number to this file")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.credit_rounds, args.fraud_rounds = 1, 2, 2
        args.customers, args.terminals, args.days = 300, 600, 75
    if min(args.seeds, args.credit_rounds, args.fraud_rounds, args.credit_epochs or 1, args.fraud_epochs or 1) < 1:
        ap.error("--seeds, --*-rounds and --*-epochs must be at least 1")
    rounds_for = {"credit": args.credit_rounds, "fraud": args.fraud_rounds}
    results = [run_dataset(name, args, rounds_for[name]) for name in ("credit", "fraud") if args.only in (None, name)]
    print(f"Machine: {machine()}\n")
    for result in results:
        print(f"### {result['name']}\n")
        print(markdown(result) + "\n")
        print(verdict(result) + "\n")
        print(weights_table(result) + "\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
