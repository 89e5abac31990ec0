"""Reading a bank's table and applying the spec's declared preprocessing.

Every bank applies the same transformation (means, stds and category levels come from the
signed spec, never from local data), so a feature means the same thing at every bank.
Missing numbers become the declared mean (0 after standardisation); missing or unseen
categories become all-zero one-hot rows. Both are summarised once per run, never hidden.

Labels are compared with their type (docs/data.md): when the spec's positive label is a
number ("1"), target values are compared as numbers, so 1, 1.0, "1" and True all match;
otherwise as text, after stripping spaces, ignoring case ("bad" matches " BAD").
A table that cannot train a model (one row, one class, no row matching the positive label, a
value more than a million standard deviations from the declared mean) is refused before any
work, so nothing half-made ever reaches the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedcli.errors import InputError
from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

MAX_STD_UNITS = 1e6  # beyond this a value is a unit or column mix-up, and float32 would overflow
REFUSED = {
    ".xlsx": "Excel files are not read: export the sheet as CSV (UTF-8)",
    ".xlsm": "Excel files are not read: export the sheet as CSV (UTF-8)",
    ".xls": "Excel files are not read: export the sheet as CSV (UTF-8)",
    ".ods": "spreadsheet files are not read: export the sheet as CSV (UTF-8)",
    ".json": "JSON tables are not read: export the table as CSV or Parquet",
    ".jsonl": "JSON tables are not read: export the table as CSV or Parquet",
}
_ZIP, _OLE = b"PK\x03\x04", b"\xd0\xcf\x11\xe0"  # .xlsx/.ods are zip archives, .xls an OLE file
SEPARATORS = (";", "\t", "|")
_SEP_NAMES = {";": "';'", "\t": "tabs", "|": "'|'", ",": "','"}


def separator_name(sep: str) -> str:
    return _SEP_NAMES.get(sep, repr(sep))


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV or Parquet; a ';'-, tab- or '|'-separated CSV is detected (df.attrs['separator'])."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist" if not path.exists() else f"data file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix in REFUSED:
        raise InputError(f"{path.name}: {REFUSED[suffix]}")
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
        if head.startswith((_ZIP, _OLE)):
            raise InputError(f"{path.name} is a spreadsheet or archive, not CSV text. {REFUSED['.xlsx']}")
        encoding = "utf-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
        df = pd.read_csv(path, encoding=encoding, low_memory=False)
        df.attrs["separator"] = ","
        if df.shape[1] == 1:  # maybe another separator: count them on the header line
            header = head.decode(encoding, errors="ignore").splitlines()[0] if head else ""
            counts = {s: header.count(s) for s in SEPARATORS}
            sep = max(counts, key=counts.__getitem__)
            if counts[sep]:
                df = pd.read_csv(path, sep=sep, encoding=encoding, low_memory=False)
                df.attrs["separator"] = sep
        return df
    except ImportError:
        raise InputError(
            f"cannot read {path}: Parquet needs pyarrow (pip install pyarrow), or export it as CSV"
        ) from None
    except UnicodeDecodeError as e:
        raise InputError(
            f"cannot read {path}: it is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}); save it as 'CSV UTF-8'"
        ) from None
    except pd.errors.EmptyDataError:
        raise InputError(f"cannot read {path}: it is empty (not even a header line)") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


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


def _seen(values: pd.Series, limit: int = 5) -> str:
    """The commonest values for a message; a line break inside one is shown as \\n so the message stays one line."""
    counts = values.astype(str).str.strip().value_counts()
    shown = ", ".join(_short("\\n".join(str(v).splitlines())) for v in counts.index[:limit])
    return shown + (f", ... ({len(counts)} distinct)" if len(counts) > limit else "")


def _short(value: str, width: int = 30) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


def prepare(df: pd.DataFrame, spec: DataSpec, source: str, need_target: bool = True) -> Prepared:
    """Turn a raw table into model inputs exactly as the spec declares.

    With need_target (train, evaluate) the labels must hold both classes; without it (predict)
    a target column is optional and only its empty rows are skipped.
    """
    _require_columns(df, spec, source)
    df, y, dropped = _labelled_rows(df, spec, source, need_target)
    if len(df) == 0:
        raise InputError(f"{source} has no usable rows")
    cols, filled, unknown, text_seen = [], {}, {}, {}
    for f in spec.numeric:
        z, n_filled, text = _standardised(df[f.name], f, source)
        if text is not None:
            text_seen[f.name] = text
        if n_filled:
            filled[f.name] = n_filled
        cols.append(z[:, None])
    for c in spec.categorical:
        onehot = _one_hot(df[c.name], c)
        n_unknown = int((onehot.sum(axis=1) == 0).sum())
        if n_unknown:
            unknown[c.name] = n_unknown
        cols.append(onehot)
    X = np.concatenate(cols, axis=1).astype(np.float32)
    return Prepared(
        X=X,
        y=y,
        rows_dropped=dropped,
        filled=filled,
        unknown=unknown,
        text=text_seen,
        separator=df.attrs.get("separator", ","),
    )


def _require_columns(df: pd.DataFrame, spec: DataSpec, source: str) -> None:
    """Every declared feature must be a column; a one-column table is probably split on the wrong separator."""
    declared = [f.name for f in spec.numeric] + [c.name for c in spec.categorical]
    missing = [name for name in declared if name not in df.columns]
    if not missing:
        return
    hint = ""
    if len(df.columns) == 1:
        hint = (
            f" (the table has one column, {_short(str(df.columns[0]), 40)!r}: is it separated by something "
            "other than ',', ';', tabs or '|'?)"
        )
    raise InputError(f"{source} lacks columns the federation spec needs: {', '.join(missing)}{hint}")


def _labelled_rows(
    df: pd.DataFrame, spec: DataSpec, source: str, need_target: bool
) -> tuple[pd.DataFrame, np.ndarray | None, int]:
    """The rows with a target value, their 0/1 labels (None without a target column) and how many were skipped."""
    if spec.target not in df.columns:
        if need_target:
            raise InputError(f"{source} lacks the target column {spec.target!r}")
        return df, None, 0
    has_target = clean_text(df[spec.target]).notna()
    df = df[has_target]
    y = parse_labels(df[spec.target], spec.positive)
    if need_target:
        _check_classes(df[spec.target], y, spec, source)
    return df, y, int((~has_target).sum())


def _standardised(raw: pd.Series, f: NumericFeature, source: str) -> tuple[np.ndarray, int, str | None]:
    """One numeric column in standard units: (values, how many were filled with the mean, a text value seen).

    Missing or non-numeric cells become the declared mean (0); a value absurdly far from it is refused.
    """
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
    text = None
    if not pd.api.types.is_numeric_dtype(raw):
        words = clean_text(raw)[np.isnan(values)].dropna()
        if len(words):
            text = _short(str(words.iloc[0]))
    z = (values - f.mean) / f.std
    absurd = np.isinf(values) | (np.abs(z) > MAX_STD_UNITS)
    if absurd.any():
        row = int(np.flatnonzero(absurd)[0])
        label = raw.index[row]
        label = f"data row {label + 1}" if isinstance(label, (int, np.integer)) else f"row {label!r}"
        raise InputError(
            f"{source}: column {f.name} has {int(absurd.sum())} value(s) more than {MAX_STD_UNITS:,.0f} standard "
            f"deviations from the spec's mean (e.g. {values[row]:g} in {label}); "
            "fix them or leave the cells empty (empty cells are filled with the mean)"
        )
    bad = np.isnan(values)
    if not bad.any():
        return z, 0, text
    return np.where(bad, 0.0, z), int(bad.sum()), text


def _one_hot(raw: pd.Series, c: CategoricalFeature) -> np.ndarray:
    """One column per declared level; a missing or undeclared category is an all-zero row."""
    text = raw.astype(str).where(raw.notna(), None)
    return np.stack([(text == lvl).to_numpy() for lvl in c.levels], axis=1).astype(np.float64)


def _check_classes(values: pd.Series, y: np.ndarray, spec: DataSpec, source: str) -> None:
    """Training and scoring need at least 2 rows and both classes; say which labels were seen."""
    if len(y) == 0:
        return  # prepare says "no usable rows"
    if len(y) < 2:
        raise InputError(f"{source} has {len(y)} usable row: at least 2 are needed, with both classes")
    where = f"{spec.target} == {spec.positive!r} ({label_rule(spec.positive)})"
    if not y.any():
        raise InputError(f"no row of {source} has {where}; values seen: {_seen(values)}")
    if y.all():
        raise InputError(f"every row of {source} has {where}: both classes are needed")


def notes(prep: Prepared, source: str) -> list[str]:
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
