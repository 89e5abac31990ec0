"""Using a published global model: score a labelled table, or predict an unlabelled one.

Both stream the table chunk by chunk (bank.sources): evaluate keeps one score and one label per
row, predict keeps nothing and writes its CSV as it goes, into a temporary file that replaces
`--out` only once every row was read and checked, so a refusal leaves no half-written output.
"""

import io
from pathlib import Path

import numpy as np

from fedcli import keys, models
from fedcli.bank import freshness, sources, tables
from fedcli.bank.kernel import probabilities
from fedcli.errors import FedcliError
from fedcli.files import atomic_writer
from fedcli.metrics import PriorCorrection, evaluation, shift_scores
from fedcli.protocol import rounds
from fedcli.store import Store


def verified_global(
    store: Store,
    coordinator_pub: Path,
    round_: int | None,
    key_path: Path | None = None,
    state_path: Path | None = None,
):
    """(spec, global, notes): the global of `round_` (default the newest), after the freshness checks
    `train` makes (bank.freshness: with `key_path`, this bank's state must not be newer than the store).

    The spec returned is the version in force for that round (protocol.chain): the global was trained on
    rows preprocessed as that version declares, so it is scored the same way (a later version may change
    a feature's mean or a category's levels)."""
    spec, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    notes = freshness.check_for_key(store, spec, spec_sha, key_path, state_path, save=True)
    r = rounds.latest_round(store) if round_ is None else round_
    if r not in rounds.global_rounds(store):
        raise FedcliError(f"round {r} has no published global model")
    g = rounds.load_global(store, spec, spec_sha, r, models.shapes(spec.model, spec.data.n_features))
    return rounds.spec_for_round(spec, spec_sha, r)[0], g, notes


def evaluate(
    store: Store,
    coordinator_pub: Path,
    data_path: Path,
    round_: int | None = None,
    prior: PriorCorrection | None = None,
    key_path: Path | None = None,
    state_path: Path | None = None,
):
    """(round, rows, metrics.Evaluation, notes) of the verified global model on a labelled table (both classes);
    with `prior`, of the prior-corrected scores."""
    spec, g, fresh = verified_global(store, coordinator_pub, round_, key_path, state_path)
    table = sources.open_table(data_path)
    prep = tables.Preparation(spec.data, table.columns, table.name, need_target=True, separator=table.separator)
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for batch in table.batches(prep.needed):
        X, y, _ = prep.chunk(tables.columns_of(batch))
        if len(X) and y is not None:
            scores.append(probabilities(spec.model, g.tensors, X))
            labels.append(y)
    prep.finish()
    y, p = np.concatenate(labels), np.concatenate(scores)
    if prior is not None:
        p = shift_scores(p, prior.shift(spec.training.pos_weight))
    return g.round, len(p), evaluation(y, p), fresh + tables.notes(prep, table.name)


def predict(
    store: Store,
    coordinator_pub: Path,
    data_path: Path,
    out: Path,
    round_: int | None = None,
    prior: PriorCorrection | None = None,
    key_path: Path | None = None,
    state_path: Path | None = None,
):
    """Write the input table with a `score` column (probability of the positive class), chunk by chunk.

    The rows are the input's, minus those whose target cell is present but empty; cells are
    copied as read (CSV text as written, Parquet values as pandas prints them). With `prior`, the
    scores are prior-corrected (metrics.PriorCorrection).
    """
    spec, g, fresh = verified_global(store, coordinator_pub, round_, key_path, state_path)
    shift = prior.shift(spec.training.pos_weight) if prior is not None else 0.0
    table = sources.open_table(data_path)
    prep = tables.Preparation(spec.data, table.columns, table.name, need_target=False, separator=table.separator)
    out = Path(out)
    if not out.parent.is_dir():
        raise FedcliError(f"cannot write {out}: cannot save a file into a non-existent directory {out.parent}")
    try:
        with atomic_writer(out, f".{out.name}.") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            try:
                _write_scores(table, prep, spec.model, g.tensors, text, shift)
                prep.finish()
                text.flush()
            finally:
                text.detach()  # the atomic writer closes (or discards) the file itself
    except OSError as e:
        raise FedcliError(f"cannot write {out}: {e.strerror or e}") from None
    return g.round, prep.rows, fresh + tables.notes(prep, table.name)


def _write_scores(
    table: sources.TableSource, prep: tables.Preparation, model, weights, text: io.TextIOBase, shift: float = 0.0
) -> None:
    """Every row with its score, chunk by chunk: the header with the first chunk."""
    for i, batch in enumerate(table.batches()):
        X, _, kept = prep.chunk(tables.columns_of(batch))
        rows = batch.to_pandas() if kept is None else batch.to_pandas()[kept]
        scores = probabilities(model, weights, X) if len(X) else np.zeros(0, np.float32)
        rows = rows.assign(score=shift_scores(scores, shift))
        rows.to_csv(text, header=i == 0, index=False)
