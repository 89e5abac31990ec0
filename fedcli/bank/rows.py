"""A bank's rows for one round: read once to check them and score the global model, then trained on.

A table of up to SHUFFLE_ROWS rows stays in memory as one float32 matrix and every epoch is a
seeded permutation of all of it (`training.fit`). A bigger table is never held: training memory is
O(SHUFFLE_ROWS), not O(table). Each epoch re-reads the table through Arrow and preprocesses it
again, in two levels of shuffling:
1. the table's parts in a seeded random order: a Parquet table's row groups (every file's), so an
   epoch does not always end on the same rows; a CSV file cannot seek and is read in file order;
2. a shuffle buffer of SHUFFLE_ROWS rows (whole batches), filled from the parts in that order and
   permuted with a seed of (round seed, buffer, epoch), trained on, then the next buffer.
A batch therefore mixes rows of about one buffer (1M rows), not of the whole table: a CSV sorted by
time is trained on in time order at that scale, as with any shuffle buffer (convert such a table to
Parquet, or shuffle it, if that matters). Every re-read must give the same number of rows, labels
and feature sums as the first read, or the round is refused: the file changed under the bank.
DP-SGD samples rows from the whole table (Poisson sampling, which its accounting assumes), so under
record-level DP the table is held in memory whatever its size.

With `[evaluation] holdout` the rows held out (bank.holdout: a keyed hash of each row) are set aside
chunk by chunk in every pass: they are never trained on, and their labels and scores of the global
model are kept from the first read (HeldOut).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from fedcli.bank import sources, tables, training
from fedcli.errors import InputError
from fedcli.protocol.spec import DataSpec

SHUFFLE_ROWS = 1_048_576  # rows held at once: 120 MiB of float32 at 30 features

Chunk = tuple[np.ndarray, np.ndarray]
Selector = Callable[[np.ndarray], np.ndarray]  # preprocessed rows -> True for the rows held out


@dataclass
class HeldOut:
    """The rows set aside for evaluation: their labels, the global model's scores, their features while they fit."""

    y: np.ndarray
    scores: np.ndarray
    X: np.ndarray | None  # None when more than SHUFFLE_ROWS rows are held out


@dataclass
class LocalRows:
    """The rows a bank trains on this round: in memory (X) when they fit the shuffle buffer, else re-read."""

    table: sources.TableSource
    spec: DataSpec
    y: np.ndarray  # every usable row's label, in table order
    X: np.ndarray | None  # the whole feature matrix when it fits SHUFFLE_ROWS rows, else None (streamed)
    notes: list[str]
    sums: np.ndarray  # every feature's sum over the rows (float64): re-reads must find the same
    held_out: Selector | None = None  # rows never trained on (bank.holdout), left out of every pass

    @property
    def streamed(self) -> bool:
        return self.X is None

    def __len__(self) -> int:
        return len(self.y)

    def matrix(self) -> np.ndarray:
        """The whole feature matrix (DP-SGD needs it): read again when it was not kept."""
        if self.X is not None:
            return self.X
        parts = [X for X, _ in self._reread()]
        return np.concatenate(parts) if parts else np.zeros((0, self.spec.n_features), np.float32)

    def epochs(self, seed: int, batch_size: int) -> training.Chunks:
        """`training.fit_stream`'s epochs: a permutation of everything in memory, else shuffled buffers."""
        if self.X is not None:
            return training.shuffled_chunks(self.X, self.y, seed, batch_size)
        step = max(1, SHUFFLE_ROWS // batch_size) * batch_size
        parts = self.table.parts()

        def epoch(e: int) -> Iterator[Chunk]:
            order = training.epoch_order(seed, e, len(parts))
            for i, (X, y) in enumerate(_buffers(self._reread([parts[k] for k in order]), step)):
                yield from training.shuffled_chunks(X, y, _buffer_seed(seed, i), batch_size)(e)

        return epoch

    def scores(self, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """score(X) for every row, in table order, holding one chunk at a time when streamed."""
        if self.X is not None:
            return score(self.X)
        return np.concatenate([score(X) for X, _ in self._reread()])

    def _reread(self, parts: list[sources.Part] | None = None) -> Iterator[Chunk]:
        """The table's chunks (of `parts` in that order, default the whole table), preprocessed again;
        refused at the end if they are not the rows read first (count, labels, feature sums)."""
        prep = tables.Preparation(self.spec, self.table.columns, self.table.name, True, self.table.separator)
        seen = _Tally(self.spec.n_features)
        in_order = parts is None
        for X, y in _chunks(self.table, prep, parts, self.held_out):
            if in_order and not np.array_equal(y, self.y[seen.rows : seen.rows + len(y)]):
                raise _changed(self.table.name)
            seen.add(X, y)
            yield X, y
        if not seen.same(len(self.y), float(self.y.sum()), self.sums):
            raise _changed(self.table.name)


def read(table: sources.TableSource, spec: DataSpec, score: Callable[[np.ndarray], np.ndarray], held_out=None):
    """(LocalRows, score(X) per training row, HeldOut or None): one pass that preprocesses, checks and scores;
    the training rows' X is kept only if it fits the shuffle buffer, the held-out rows' likewise."""
    prep = tables.Preparation(spec, table.columns, table.name, True, table.separator)
    kept: list[np.ndarray] | None = []
    labels: list[np.ndarray] = []
    scored: list[np.ndarray] = []
    aside = _Aside()
    tally = _Tally(spec.n_features)
    for X, y in _chunks(table, prep):
        p = score(X)
        if held_out is not None:
            held = held_out(X)
            aside.add(X[held], y[held], p[held])
            X, y, p = X[~held], y[~held], p[~held]
        scored.append(p)
        labels.append(y)
        tally.add(X, y)
        if kept is not None and tally.rows <= SHUFFLE_ROWS:
            kept.append(X)
        else:
            kept = None
    prep.finish()
    y = _joined(labels, (0,))
    held_matrix = None if kept is None else _joined(kept, (0, spec.n_features))
    rows = LocalRows(table, spec, y, held_matrix, tables.notes(prep, table.name), tally.sums, held_out)
    return rows, _joined(scored, (0,)), (aside.done(spec.n_features) if held_out is not None else None)


def _joined(parts: list[np.ndarray], empty: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty, np.float32)


class _Aside:
    """The held-out rows of the first pass."""

    def __init__(self) -> None:
        self.X: list[np.ndarray] | None = []
        self.y: list[np.ndarray] = []
        self.p: list[np.ndarray] = []
        self.n = 0

    def add(self, X: np.ndarray, y: np.ndarray, p: np.ndarray) -> None:
        self.y.append(y)
        self.p.append(p)
        self.n += len(y)
        if self.X is not None and self.n <= SHUFFLE_ROWS:
            self.X.append(X)
        else:
            self.X = None

    def done(self, width: int) -> HeldOut:
        X = None if self.X is None else _joined(self.X, (0, width))
        return HeldOut(_joined(self.y, (0,)), _joined(self.p, (0,)), X)


def _chunks(
    table: sources.TableSource,
    prep: tables.Preparation,
    parts: list[sources.Part] | None = None,
    held_out: Selector | None = None,
) -> Iterator[Chunk]:
    batches = (
        table.batches(prep.needed)
        if parts is None
        else (batch for part in parts for batch in table.part_batches(part, prep.needed))
    )
    for batch in batches:
        X, y, _ = prep.chunk(tables.columns_of(batch))
        assert y is not None  # need_target: every kept row has a label
        if held_out is not None and len(X):
            train = ~held_out(X)
            X, y = X[train], y[train]
        if len(X):
            yield X, y


class _Tally:
    """Rows, positives and feature sums of a pass: what a re-read must find again, in any order."""

    def __init__(self, width: int) -> None:
        self.rows, self.positives, self.sums = 0, 0.0, np.zeros(width)

    def add(self, X: np.ndarray, y: np.ndarray) -> None:
        self.rows += len(X)
        self.positives += float(y.sum())
        self.sums += X.sum(axis=0, dtype=np.float64)

    def same(self, rows: int, positives: float, sums: np.ndarray) -> bool:
        """Equal counts, and sums equal up to float64 rounding in another order."""
        scale = np.maximum(np.abs(sums), float(self.rows or 1))
        return (
            self.rows == rows and self.positives == positives and bool(np.all(np.abs(self.sums - sums) <= 1e-9 * scale))
        )


class _Buffer:
    """Chunks gathered until a shuffle buffer of whole batches is full."""

    def __init__(self) -> None:
        self.X: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.n = 0

    def add(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X.append(X)
        self.y.append(y)
        self.n += len(X)

    def take(self, rows: int) -> Chunk:
        """The first `rows` rows gathered; the rest stay for the next buffer."""
        X, y = np.concatenate(self.X), np.concatenate(self.y)
        self.X, self.y, self.n = [X[rows:]], [y[rows:]], len(X) - rows
        return X[:rows], y[:rows]


def _buffers(chunks: Iterator[Chunk], step: int) -> Iterator[Chunk]:
    """The chunks regrouped into buffers of `step` rows (whole batches), the last one shorter."""
    buffer = _Buffer()
    for X, y in chunks:
        buffer.add(X, y)
        while buffer.n >= step:
            yield buffer.take(step)
    if buffer.n:
        yield buffer.take(buffer.n)


def _buffer_seed(seed: int, i: int) -> int:
    """Buffer i's permutation seed: a different permutation per buffer, the same on a rerun of the round."""
    return (seed + 0x9E3779B97F4A7C15 * (i + 1)) % 2**64


def _changed(name: str) -> InputError:
    return InputError(f"{name} changed while the bank was training on it: nothing was submitted; run train again")
