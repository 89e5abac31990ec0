"""Using a published global model: score a labelled table, or predict an unlabelled one."""

from pathlib import Path

import pandas as pd

from fedcli import keys, models
from fedcli.bank import tables
from fedcli.errors import FedcliError
from fedcli.metrics import evaluation
from fedcli.protocol import rounds
from fedcli.store import Store


def verified_global(store: Store, coordinator_pub: Path, round_: int | None):
    spec, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    r = rounds.latest_round(store) if round_ is None else round_
    if r not in rounds.global_rounds(store):
        raise FedcliError(f"round {r} has no published global model")
    return spec, rounds.load_global(store, spec, spec_sha, r, models.shapes(spec.model, spec.data.n_features))


def evaluate(store: Store, coordinator_pub: Path, data_path: Path, round_: int | None = None):
    """(round, rows, metrics.Evaluation, notes) of the verified global model on a labelled table (both classes)."""
    spec, g = verified_global(store, coordinator_pub, round_)
    prep = tables.prepare(tables.read_table(data_path), spec.data, Path(data_path).name)
    p = models.predict(spec.model, g.tensors, prep.X)
    return (
        g.round,
        len(p),
        evaluation(prep.labels(), p),
        tables.notes(prep, Path(data_path).name),
    )


def predict(store: Store, coordinator_pub: Path, data_path: Path, out: Path, round_: int | None = None):
    """Write the input table with a `score` column (probability of the positive class)."""
    spec, g = verified_global(store, coordinator_pub, round_)
    df = tables.read_table(data_path)
    prep = tables.prepare(df, spec.data, Path(data_path).name, need_target=False)
    if spec.data.target in df.columns:  # the same rows prepare kept
        df = df[tables.clean_text(df[spec.data.target]).notna()]
    out_df = pd.DataFrame(df).assign(score=models.predict(spec.model, g.tensors, prep.X))
    try:
        out_df.to_csv(out, index=False)
    except OSError as e:
        raise FedcliError(f"cannot write {out}: {e.strerror or e}") from None
    return g.round, len(out_df), tables.notes(prep, Path(data_path).name)
