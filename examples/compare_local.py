"""Compare the federated model with what each bank could train alone, on the same holdout.

Local-only models start from the same round-0 weights and train for as many epochs as the
federated model saw in total (rounds x epochs), so the comparison is fair in compute, and on the
rows the bank trains on in the federation (without its `[evaluation] holdout` rows).
"""

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcli import keys, models
from fedcli.bank import tables
from fedcli.bank.holdout import holdout_rows
from fedcli.bank.training import fit
from fedcli.metrics import score
from fedcli.protocol import rounds
from fedcli.protocol.spec import TrainingSpec
from fedcli.store import open_store


def compare(store_path: str, coordinator_pub: str, data_dir: Path) -> dict[str, dict]:
    store = open_store(store_path)
    spec, spec_sha = rounds.load_spec(store, keys.load_public(Path(coordinator_pub)))
    shapes = models.shapes(spec.model, spec.data.n_features)
    last = rounds.latest_round(store)
    g0 = rounds.load_global(store, spec, spec_sha, 0, shapes)
    g = rounds.load_global(store, spec, spec_sha, last, shapes)
    test = tables.prepare(tables.read_table(data_dir / "test.csv"), spec.data, "test.csv")
    results = {"federated": score(test.y, models.predict(spec.model, g.tensors, test.X))}
    local_cfg = TrainingSpec(
        epochs=spec.training.epochs * max(last, 1), batch_size=spec.training.batch_size, lr=spec.training.lr
    )
    for m in spec.members:
        bank = tables.prepare(tables.read_table(data_dir / f"{m.name}.csv"), spec.data, m.name)
        keep = ~holdout_rows(spec.federation_id, bank.X, spec.evaluation.holdout)  # the rows the bank trains on
        w, _ = fit(spec.model, local_cfg, g0.tensors, bank.X[keep], bank.y[keep], seed=1)
        results[f"{m.name} alone"] = score(test.y, models.predict(spec.model, w, test.X))
    return results


if __name__ == "__main__":
    res = compare(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    table = Table(title="holdout metrics")
    for col in ("model", "auc", "pr_auc", "ks"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, m in res.items():
        table.add_row(name, f"{m['auc']:.4f}", f"{m['pr_auc']:.4f}", f"{m['ks']:.4f}")
    local = [m["auc"] for n, m in res.items() if n != "federated"]
    Console().print(table)
    print(f"federated AUC {res['federated']['auc']:.4f} vs mean local-only AUC {sum(local) / len(local):.4f}")
