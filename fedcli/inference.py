"""Using a published global model: score a labelled table, or predict an unlabelled one."""

from pathlib import Path

import numpy as np
import pandas as pd

from . import data as D
from . import keys, models
from . import rounds as R
from .errors import FedcliError
from .metrics import score
from .store import Store


def verified_global(store: Store, coordinator_pub: Path, round_: int | None):
    spec, spec_sha = R.load_spec(store, keys.load_public(coordinator_pub))
    r = R.latest_round(store) if round_ is None else round_
    if r not in R.global_rounds(store):
        raise FedcliError(f"round {r} has no published global model")
    return spec, R.load_global(store, spec, spec_sha, r, models.shapes(spec.model, spec.data.n_features))


def evaluate(store: Store, coordinator_pub: Path, data_path: Path, round_: int | None = None):
    """Return (round, rows, metrics, notes) of the verified global model on a labelled table (both classes)."""
    spec, g = verified_global(store, coordinator_pub, round_)
    prep = D.prepare(D.read_table(data_path), spec.data, Path(data_path).name)
    p = models.predict(spec.model, g.tensors, prep.X)
    return g.round, len(p), score(prep.y, p) | {"positive_rate": float(np.mean(prep.y))}, D.notes(prep, Path(data_path).name)


def predict(store: Store, coordinator_pub: Path, data_path: Path, out: Path, round_: int | None = None):
    """Write the input table with a `score` column (probability of the positive class)."""
    spec, g = verified_global(store, coordinator_pub, round_)
    df = D.read_table(data_path)
    prep = D.prepare(df, spec.data, Path(data_path).name, need_target=False)
    if spec.data.target in df.columns:  # the same rows prepare kept
        df = df[D.clean_text(df[spec.data.target]).notna()]
    out_df = pd.DataFrame(df).assign(score=models.predict(spec.model, g.tensors, prep.X))
    try:
        out_df.to_csv(out, index=False)
    except OSError as e:
        raise FedcliError(f"cannot write {out}: {e.strerror or e}") from None
    return g.round, len(out_df), D.notes(prep, Path(data_path).name)
