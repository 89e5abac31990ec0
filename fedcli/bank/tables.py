"""Applying the spec's declared preprocessing to a bank's table, one chunk of rows at a time.

Every bank applies the same transformation (means, stds and category levels come from the
signed spec, never from local data), so a feature means the same thing at every bank, and
the transformation of a row needs no other row: a table streams through in chunks
(bank.sources), and what stays in memory is the float32 feature matrix and the labels.
Missing numbers become the declared mean (0 after standardisation); missing or unseen
categories become all-zero one-hot rows. Both are summarised once per run, never hidden.

Labels are compared with their type (docs/data.md): when the spec's positive label is a
number ("1"), target values are compared as numbers, so 1, 1.0, "1" and True all match;
otherwise as text, after stripping spaces, ignoring case ("bad" matches " BAD").
Categories match the spec's levels as written; a level that is a number also matches the same
number however it is written ("1", "1.0"), and "True"/"False" match in any case, so a level
means the same in a CSV file (text) and a Parquet file (typed).
A table that cannot train a model (one row, one class, no row matching the positive label, a
value more than a million standard deviations from the declared mean) is refused before any
work, so nothing half-made ever reaches the store. Those checks need every row, so they run
when the last chunk is in (`Preparation.finish`), with the same messages whatever the chunking.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedcli.bank.sources import ROWS_PER_BATCH, TableSource, open_table
from fedcli.errors import InputError
from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

MAX_STD_UNITS = 1e6  # beyond this a value is a unit or column mix-up, and float32 would overflow
MAX_SEEN = 100_000  # distinct target values remembered for the "values seen" of a refusal
_SEP_NAMES = {";": "';'", "\t": "tabs", "|": "'|'", ",": "','"}
_BOOLS = {"True": "true", "False": "false"}  # pandas' spelling of a boolean level -> the text it matches, any case
_BOOL_WORDS = ["True", "TRUE", "true", "False", "FALSE", "false"]  # what pandas' reader takes for a boolean

Column: TypeAlias = Any  # a pyarrow Array or ChunkedArray, or a pandas Series (pyarrow has no type stubs)


def separator_name(sep: str) -> str:
    return _SEP_NAMES.get(sep, repr(sep))


def read_table(location: str | Path) -> pd.DataFrame:
    """The whole table as a DataFrame typed as pandas would (for `fedcli schema`, which needs whole columns).

    CSV columns whose every cell is a number become numbers (int64 when all are integers and none is
    missing), those of only true/false booleans, the rest text; df.attrs['separator'] says how a CSV file
    was separated. Training, evaluate and predict stream instead (`prepare` on a TableSource).
    """
    source = open_table(location)
    frames = [batch.to_pandas() for batch in source.batches()]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=source.columns)
    if source.separator is not None:
        df = df.apply(_typed) if len(df) else df
    df.attrs["separator"] = source.separator or ","
    return df


def _typed(values: pd.Series) -> pd.Series:
    """A column of CSV text as pandas' reader would type it: integers, floats, booleans, or text."""
    present = values.dropna()
    if not len(present):
        return values.astype(np.float64)
    numbers = _as_numbers(present, missing=len(present) < len(values))
    if numbers is not None:
        return numbers.reindex(values.index) if len(present) < len(values) else numbers
    if len(present) == len(values) and present.isin(_BOOL_WORDS).all():
        return values.str.casefold() == "true"
    return values.astype(object).where(values.notna(), None)


def _as_numbers(text: pd.Series, missing: bool) -> pd.Series | None:
    """Text cells that are all numbers, typed as pandas' reader types them (int64 only with no cell missing)."""
    numbers = pd.to_numeric(text, errors="coerce")
    if not numbers.notna().all():
        return None
    whole = not missing and text.astype(str).str.strip().str.fullmatch(r"[+-]?\d+").all()
    return numbers.astype(np.int64 if whole and numbers.abs().max() < 2**63 else np.float64)


@dataclass
class Prepared:
    X: np.ndarray  # float32, (rows, n_features)
    y: np.ndarray | None  # float32 0/1, None when the table has no target column
    rows_dropped: int  # rows without a target value
    filled: dict[str, int]  # feature -> values missing or not a number, filled with the mean
    unknown: dict[str, int]  # feature -> rows whose category the spec does not declare
    text: dict[str, str] = field(default_factory=dict)  # numeric feature -> one text value seen in it
    separator: str = ","

    def labels(self) -> np.ndarray:
        """The 0/1 labels: prepare(need_target=True) guarantees them; only a table for predict may lack them."""
        if self.y is None:
            raise InputError("this table has no target column: it can be scored, not trained or evaluated on")
        return self.y


def feature_names(spec: DataSpec) -> list[str]:
    names = [f.name for f in spec.numeric]
    for c in spec.categorical:
        names += [f"{c.name}={lvl}" for lvl in c.levels]
    return names


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def clean_text(values: pd.Series) -> pd.Series:
    """Values as stripped text; missing stays missing, and blank text counts as missing."""
    text = values.astype(str).str.strip().where(values.notna(), None)
    return text.where(text != "", None)


def label_rule(positive: str) -> str:
    """The comparison `parse_labels` makes, in words (for messages and docs)."""
    return "compared as numbers" if _number(positive) is not None else "compared as text, ignoring case and spaces"


def parse_labels(values: pd.Series, positive: str) -> np.ndarray:
    """1.0 where a (non-missing) target value equals the positive label, by the rule in the module doc."""
    wanted = _number(str(positive))
    if wanted is None:
        text = values.astype(str).str.strip().str.casefold()
        return (text == str(positive).strip().casefold()).to_numpy(np.float32)
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        numbers = values.astype(np.float64)
    else:
        text = values.astype(str).str.strip().str.lower().replace({"true": "1", "false": "0"})
        numbers = pd.to_numeric(text, errors="coerce")
    return (numbers == wanted).to_numpy(np.float32)


def _seen(values: Counter | pd.Series, limit: int = 5, capped: bool = False) -> str:
    """The commonest values for a message; a line break inside one is shown as \\n so the message stays one line."""
    counts = values if isinstance(values, Counter) else _counts(values)
    shown = ", ".join(_short("\\n".join(str(v).splitlines())) for v, _ in counts.most_common(limit))
    if len(counts) <= limit:
        return shown
    return shown + f", ... ({'more than ' if capped else ''}{len(counts)} distinct)"


def _counts(values: pd.Series) -> Counter:
    """How often each value occurs, as stripped text, in order of first appearance (ties keep that order)."""
    counts: Counter = Counter()
    for value, count in values.astype(str).str.strip().value_counts(sort=False).items():
        counts[value] += int(count)
    return counts


def _short(value: str, width: int = 30) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


# --------------------------------------------------------------------------- columns, whatever holds them


def _series(col: Column) -> pd.Series:
    return col if isinstance(col, pd.Series) else col.to_pandas()


def _plain(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Dictionary-encoded (categorical) Arrow columns decoded to their values."""
    return pc.cast(col, col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_numeric(kind: pa.DataType) -> bool:
    return (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_boolean(kind)
    )


def _cast_numbers(col: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """Arrow numbers, or text that is all numbers, as float64 (NaN where missing); None if some text is not a number."""
    try:
        numbers = pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return np.asarray(numbers.to_numpy(zero_copy_only=False), dtype=np.float64)


def _numbers(col: Column, name: str, source: str) -> tuple[np.ndarray, str | None]:
    """Cells as float64 numbers (NaN where missing or not a number) and one text value that was not a number."""
    if isinstance(col, pd.Series):
        return _series_numbers(col)
    col = _plain(col)
    if _is_numeric(col.type) or _is_text(col.type):
        numbers = _cast_numbers(col)  # the fast path: every cell a number
        if numbers is not None:
            return numbers, None
        return _series_numbers(col.to_pandas())
    if pa.types.is_temporal(col.type):
        return _series_numbers(col.to_pandas())
    raise InputError(f"{source}: column {name} holds {col.type} values, not numbers")


def _series_numbers(raw: pd.Series) -> tuple[np.ndarray, str | None]:
    """pandas' reading of numbers, plus true/false (any case) as 1/0, whatever else the column holds."""
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    if pd.api.types.is_numeric_dtype(raw) or not np.isnan(values).any():
        return values, None
    text = clean_text(raw)
    words = text.str.casefold()
    values = np.where(np.isnan(values) & (words == "true").to_numpy(bool, na_value=False), 1.0, values)
    values = np.where(np.isnan(values) & (words == "false").to_numpy(bool, na_value=False), 0.0, values)
    left = text[np.isnan(values)].dropna()
    return values, (_short(str(left.iloc[0])) if len(left) else None)


def _label_numbers(col: Column, wanted: float | None) -> np.ndarray | None:
    """Target values as numbers when the positive label is one and every value is (the fast path), else None."""
    if wanted is None:
        return None
    if isinstance(col, pd.Series):
        numeric = pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
        return col.to_numpy(np.float64, na_value=np.nan) if numeric else None
    col = _plain(col)
    if not (_is_numeric(col.type) or _is_text(col.type)):
        return None
    numbers = _cast_numbers(col)
    if numbers is None or (not _is_numeric(col.type) and np.isnan(numbers).sum() != col.null_count):
        return None  # text like "NAN" would be a label value to pandas, not a missing one
    return numbers


def _one_hot(col: Column, c: CategoricalFeature) -> np.ndarray:
    """One column per declared level; a missing or undeclared category is an all-zero row."""
    if not isinstance(col, pd.Series) and _is_text(_plain(col).type):  # CSV text: compared in Arrow
        col = _plain(col)
        matches = [pc.fill_null(pc.equal(col, lvl), False).to_numpy(zero_copy_only=False) for lvl in c.levels]
    else:  # typed values (Parquet numbers, booleans) compared as pandas spells them
        col = _series(col)
        text = col.astype(str).where(col.notna(), None)
        matches = [(text == lvl).to_numpy(bool, na_value=False) for lvl in c.levels]
    onehot = np.stack(matches, axis=1)
    _equivalents(onehot, col, c)
    return onehot.astype(np.float64)


def _equivalents(onehot: np.ndarray, col: Column, c: CategoricalFeature) -> None:
    """Rows no level matched as written: a number level matches the same number, True/False any case."""
    numeric = [(j, _number(lvl)) for j, lvl in enumerate(c.levels) if _number(lvl) is not None]
    bools = [(j, _BOOLS[lvl]) for j, lvl in enumerate(c.levels) if lvl in _BOOLS]
    if not (numeric or bools):
        return
    open_rows = ~onehot.any(axis=1)
    if not open_rows.any():
        return
    raw = _series(col)
    if numeric:
        values = (
            pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
            if not pd.api.types.is_bool_dtype(raw)
            else np.full(len(raw), np.nan)
        )
        for j, number in numeric:
            hit = open_rows & (values == number)
            onehot[hit, j] = True
            open_rows &= ~hit
    if bools:
        words = raw.astype(str).str.strip().str.casefold().where(raw.notna(), None)
        for j, word in bools:
            hit = open_rows & (words == word).to_numpy(bool, na_value=False)
            onehot[hit, j] = True
            open_rows &= ~hit


# --------------------------------------------------------------------------- preparation, chunk by chunk


@dataclass
class _Absurd:
    count: int
    value: float
    where: str


class Preparation:
    """One table's preprocessing: feed it chunks of rows in order, then `finish` runs the checks that need them all.

    With need_target (train, evaluate) the labels must hold both classes; without it (predict)
    a target column is optional and only its empty rows are skipped.
    """

    def __init__(
        self, spec: DataSpec, columns: Sequence, source: str, need_target: bool = True, separator: str | None = ","
    ):
        _require_columns(list(columns), spec, source)
        self.spec, self.source, self.need_target = spec, source, need_target
        self.labelled = spec.target in columns
        if need_target and not self.labelled:
            raise InputError(f"{source} lacks the target column {spec.target!r}")
        self.separator = separator or ","
        self.wanted = _number(str(spec.positive))
        self.rows_read = self.rows = self.positives = self.rows_dropped = 0
        self.filled: dict[str, int] = {}
        self.text: dict[str, str] = {}
        self.unknown: dict[str, int] = {}
        self.absurd: dict[str, _Absurd] = {}
        self.seen: Counter | None = Counter()  # target values while no positive has shown up
        self.seen_capped = False
        self.target_text, self.target_nulls = False, 0  # the target as CSV text, and its missing cells

    @property
    def needed(self) -> list[str]:
        """The columns preprocessing reads: the declared features and, when present, the target."""
        names = [f.name for f in self.spec.numeric] + [c.name for c in self.spec.categorical]
        return names + [self.spec.target] * self.labelled

    @property
    def width(self) -> int:
        return self.spec.n_features

    def chunk(self, columns: Mapping, row_names=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(X, y, kept) for the next rows: kept marks the rows with a target value (None when all are kept).

        `columns` maps a column name to its cells (Arrow or pandas); `row_names` labels the rows in
        messages (default: their position in the table).
        """
        n = len(columns[self.needed[0]]) if self.needed else 0
        if row_names is None:
            row_names = np.arange(self.rows_read, self.rows_read + n)
        self.rows_read += n
        kept, y = self._labels(columns[self.spec.target]) if self.labelled else (None, None)
        if kept is not None:
            row_names = np.asarray(row_names)[kept]
            columns = {name: _take(columns[name], kept) for name in self.needed}
        X = np.empty((len(row_names), self.width), np.float32)
        for j, f in enumerate(self.spec.numeric):
            with np.errstate(over="ignore"):  # a value beyond float32 is refused by finish()
                X[:, j] = self._standardised(columns[f.name], f, row_names)
        j = len(self.spec.numeric)
        for c in self.spec.categorical:
            onehot = _one_hot(columns[c.name], c)
            n_unknown = int((onehot.sum(axis=1) == 0).sum())
            if n_unknown:
                self.unknown[c.name] = self.unknown.get(c.name, 0) + n_unknown
            X[:, j : j + len(c.levels)] = onehot
            j += len(c.levels)
        self.rows += len(X)
        return X, y, kept

    def _labels(self, col: Column) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows with a target value (None when all have one) and their 0/1 labels; remember what was skipped or seen."""
        numbers = _label_numbers(col, self.wanted)
        values = None
        if numbers is not None:
            has = ~np.isnan(numbers)
            y = (numbers[has] == self.wanted).astype(np.float32)
        else:
            series = _series(col)
            has = clean_text(series).notna().to_numpy(bool)
            values = series[has]
            y = parse_labels(values, self.spec.positive)
        self.rows_dropped += int(len(has) - has.sum())
        if not isinstance(col, pd.Series) and _is_text(col.type):  # CSV cells: how pandas would have typed them
            self.target_nulls += col.null_count
            self.target_text = True
        positives = int(y.sum())
        if self.need_target and self.seen is not None and not positives:
            self._count_seen(values if values is not None else _series(col)[has])
        if positives:
            self.positives += positives
            self.seen = None  # a positive row exists: the values seen will never be needed
        return (None if has.all() else has), y

    def _count_seen(self, values: pd.Series) -> None:
        assert self.seen is not None
        for value, count in _counts(values).items():
            if value in self.seen or len(self.seen) < MAX_SEEN:
                self.seen[value] += count
            else:
                self.seen_capped = True

    def _seen_as_pandas_shows(self) -> Counter:
        """Target values as a whole-table read typed them: in a CSV column of numbers with a missing cell, 0 is 0.0."""
        counts = self.seen or Counter()
        if not self.target_text or self.rows_dropped > self.target_nulls or not counts:
            return counts  # not CSV text, or a blank cell made pandas keep the column as text
        keys = pd.Series(list(counts), dtype=object)
        numbers = _as_numbers(keys, missing=self.target_nulls > 0)
        if numbers is not None:
            spelt = numbers.astype(str)
        elif not self.target_nulls and keys.isin(_BOOL_WORDS).all():
            spelt = (keys.str.casefold() == "true").astype(str)
        else:
            return counts
        shown: Counter = Counter()
        for text, count in zip(spelt, counts.values(), strict=True):
            shown[text] += count
        return shown

    def _standardised(self, raw: Column, f: NumericFeature, row_names: np.ndarray) -> np.ndarray:
        """One numeric column in standard units; missing or non-numeric cells become the declared mean (0)."""
        values, text = _numbers(raw, f.name, self.source)
        if text is not None and f.name not in self.text:
            self.text[f.name] = text
        with np.errstate(over="ignore", invalid="ignore"):
            z = (values - f.mean) / f.std
            absurd = np.isinf(values) | (np.abs(z) > MAX_STD_UNITS)
        if absurd.any():
            self._absurd(f.name, values, absurd, row_names)
        bad = np.isnan(values)
        if not bad.any():
            return z
        self.filled[f.name] = self.filled.get(f.name, 0) + int(bad.sum())
        return np.where(bad, 0.0, z)

    def _absurd(self, name: str, values: np.ndarray, absurd: np.ndarray, row_names: np.ndarray) -> None:
        row = int(np.flatnonzero(absurd)[0])
        if name in self.absurd:
            self.absurd[name].count += int(absurd.sum())
            return
        label = row_names[row]
        where = f"data row {label + 1}" if isinstance(label, (int, np.integer)) else f"row {label!r}"
        self.absurd[name] = _Absurd(int(absurd.sum()), float(values[row]), where)

    def finish(self) -> None:
        """The checks that need every row, in the order a whole-table read makes them."""
        if self.need_target:
            self._check_classes()
        if self.rows == 0:
            raise InputError(f"{self.source} has no usable rows")
        for f in self.spec.numeric:  # the first declared column at fault
            bad = self.absurd.get(f.name)
            if bad is not None:
                raise InputError(
                    f"{self.source}: column {f.name} has {bad.count} value(s) more than {MAX_STD_UNITS:,.0f} standard "
                    f"deviations from the spec's mean (e.g. {bad.value:g} in {bad.where}); "
                    "fix them or leave the cells empty (empty cells are filled with the mean)"
                )

    def _check_classes(self) -> None:
        """Training and scoring need at least 2 rows and both classes; say which labels were seen."""
        spec, source = self.spec, self.source
        if self.rows == 0:
            return  # finish says "no usable rows"
        if self.rows < 2:
            raise InputError(f"{source} has {self.rows} usable row: at least 2 are needed, with both classes")
        where = f"{spec.target} == {spec.positive!r} ({label_rule(spec.positive)})"
        if not self.positives:
            seen = _seen(self._seen_as_pandas_shows(), capped=self.seen_capped)
            raise InputError(f"no row of {source} has {where}; values seen: {seen}")
        if self.positives == self.rows:
            raise InputError(f"every row of {source} has {where}: both classes are needed")

    def summary(self, X: np.ndarray, y: np.ndarray | None) -> Prepared:
        return Prepared(
            X=X,
            y=y,
            rows_dropped=self.rows_dropped,
            filled=self.filled,
            unknown=self.unknown,
            text=self.text,
            separator=self.separator,
        )


def _take(col: Column, kept: np.ndarray) -> Column:
    if isinstance(col, pd.Series):
        return col[kept]
    return col.filter(pa.array(kept))


def columns_of(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    return {name: batch.column(i) for i, name in enumerate(batch.schema.names)}


def prepare(
    table: pd.DataFrame | TableSource,
    spec: DataSpec,
    source: str | None = None,
    need_target: bool = True,
    rows_per_batch: int = ROWS_PER_BATCH,
) -> Prepared:
    """Turn a table into model inputs exactly as the spec declares: a DataFrame in one go, a source chunk by chunk.

    With need_target (train, evaluate) the labels must hold both classes; without it (predict)
    a target column is optional and only its empty rows are skipped.
    """
    if isinstance(table, pd.DataFrame):
        prep = Preparation(spec, list(table.columns), source or "table", need_target, table.attrs.get("separator", ","))
        X, y, _ = prep.chunk({name: table[name] for name in prep.needed}, row_names=table.index)
        prep.finish()
        return prep.summary(X, y)
    prep = Preparation(spec, table.columns, source or table.name, need_target, table.separator)
    matrix = _Rows(prep.width, table.rows)
    labels: list[np.ndarray] = []
    for batch in table.batches(prep.needed, rows_per_batch):
        X, y, _ = prep.chunk(columns_of(batch))
        matrix.add(X)
        if y is not None:
            labels.append(y)
    prep.finish()
    return prep.summary(
        matrix.done(), np.concatenate(labels) if labels else (np.zeros(0, np.float32) if prep.labelled else None)
    )


class _Rows:
    """The feature matrix, filled chunk by chunk: in place when the row count is known (Parquet), else from parts.

    Joining parts copies each into the result and frees it at once; the result's pages are only
    committed as they are written, so the peak stays near one matrix, not two.
    """

    def __init__(self, width: int, rows: int | None):
        self.width = width
        try:  # pages are committed only as rows are written: a false count in hostile metadata costs nothing
            self.full = np.empty((rows, width), np.float32) if rows is not None else None
        except (MemoryError, ValueError):  # a count no machine could hold: join the parts actually read
            self.full = None
        self.parts: list[np.ndarray] = []
        self.n = 0

    def add(self, X: np.ndarray) -> None:
        if self.full is not None and self.n + len(X) > len(self.full):  # the metadata undercounted: join instead
            self.parts, self.full = [self.full[: self.n].copy()], None
        if self.full is not None:
            self.full[self.n : self.n + len(X)] = X
        else:
            self.parts.append(X)
        self.n += len(X)

    def done(self) -> np.ndarray:
        if self.full is not None:
            return self.full[: self.n]
        out = np.empty((self.n, self.width), np.float32)
        at = 0
        while self.parts:
            part = self.parts.pop(0)
            out[at : at + len(part)] = part
            at += len(part)
        return out


def _require_columns(columns: list, spec: DataSpec, source: str) -> None:
    """Every declared feature must be a column; a one-column table is probably split on the wrong separator."""
    declared = [f.name for f in spec.numeric] + [c.name for c in spec.categorical]
    missing = [name for name in declared if name not in columns]
    if not missing:
        return
    hint = ""
    if len(columns) == 1:
        hint = (
            f" (the table has one column, {_short(str(columns[0]), 40)!r}: is it separated by something "
            "other than ',', ';', tabs or '|'?)"
        )
    raise InputError(f"{source} lacks columns the federation spec needs: {', '.join(missing)}{hint}")


def notes(prep: Prepared | Preparation, source: str) -> list[str]:
    """What preprocessing did to this table, in plain words, one line per kind."""
    out = []
    if prep.separator != ",":
        out.append(f"{source} is separated by {separator_name(prep.separator)}")
    if prep.rows_dropped:
        out.append(f"{prep.rows_dropped:,} row(s) without a target value were skipped")
    if prep.filled:
        total = sum(prep.filled.values())
        cols = ", ".join(f"{c} {n:,}" for c, n in prep.filled.items())
        line = (
            f"{len(prep.filled)} column(s) had missing values ({total:,} values in all), filled with the spec's "
            f"mean: {cols}"
        )
        if prep.text:
            line += "; text counted as missing: " + ", ".join(f"{c} (e.g. {t!r})" for c, t in prep.text.items())
        out.append(line)
    if prep.unknown:
        out.append(
            "unknown category -> all-zero one-hot: "
            + ", ".join(f"{c} {n:,} row{'' if n == 1 else 's'}" for c, n in prep.unknown.items())
        )
    return out


def mixed_columns(df: pd.DataFrame) -> list[tuple[str, int, int, str]]:
    """Text columns where some values are numbers and some are not: (column, numbers, texts, a text value)."""
    out = []
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            continue
        text = clean_text(s).dropna()
        numeric = pd.to_numeric(text, errors="coerce").notna()
        n_num, n_text = int(numeric.sum()), int((~numeric).sum())
        if n_num and n_text:
            out.append((str(col), n_num, n_text, _short(str(text[~numeric].iloc[0]))))
    return out


def infer_schema(df: pd.DataFrame, target: str, positive: str, max_levels: int = 30) -> tuple[dict, list[str]]:
    """Draft a [data] section from a table (only means, stds, level names) and warnings about it."""
    if target not in df.columns:
        raise InputError(f"target column {target!r} not in the table (columns: {', '.join(map(str, df.columns))})")
    mixed = mixed_columns(df)
    if mixed:
        col, n_num, n_text, example = mixed[0]
        raise InputError(
            f"column {col} mixes numbers ({n_num:,} row{'s' * (n_num != 1)}) and text ({n_text:,} row{'s' * (n_text != 1)}, e.g. {example!r}): "
            "make it all numbers (leave unknown cells empty) or all categories"
        )
    warnings = []
    labels = df[target][clean_text(df[target]).notna()]
    y = parse_labels(labels, str(positive))
    where = f"{target} == {str(positive)!r} ({label_rule(str(positive))})"
    if not y.any():
        warnings.append(f"no row has {where}; values seen: {_seen(labels)}. Check --positive.")
    elif y.all():
        warnings.append(f"every row has {where}: a model needs both classes")
    numeric, categorical = [], []
    for col in df.columns:
        if col == target or str(col).lower() in ("rownames", "id", "index"):
            continue
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            values = s.astype(np.float64).replace([np.inf, -np.inf], np.nan)
            with np.errstate(over="ignore", invalid="ignore"):  # overflowing stds fall back to 1 below
                std = float(values.std()) if values.notna().sum() > 1 else 1.0
                mean = float(values.mean()) if values.notna().any() else 0.0
            numeric.append(
                {
                    "name": str(col),
                    "mean": round(mean, 6),
                    "std": round(std, 6) if math.isfinite(std) and round(std, 6) > 0 else 1.0,
                }
            )
        else:
            levels = [str(v) for v in s.dropna().astype(str).value_counts().index[:max_levels]]
            categorical.append({"name": str(col), "levels": sorted(levels)})
    return {"target": target, "positive": str(positive), "numeric": numeric, "categorical": categorical}, warnings
