"""Reading a bank's table and applying the spec's declared preprocessing.

Every bank applies the same transformation (means, stds and category levels come from the
signed spec, never from local data), so a feature means the same thing at every bank.
Missing numbers become the declared mean (0 after standardisation); missing or unseen
categories become all-zero one-hot rows. Counts of both are reported, never hidden.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import FedcliError
from .spec import DataSpec


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FedcliError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except ImportError as e:
        raise FedcliError(f"cannot read {path}: {e} (install pyarrow for Parquet)") from None
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise FedcliError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


@dataclass
class Prepared:
    X: np.ndarray  # float32, (rows, n_features)
    y: np.ndarray | None  # float32 0/1, None when the table has no target column
    rows_dropped: int  # rows without a target value
    filled: dict[str, int]  # feature -> values missing or unparseable, filled with the mean
    unknown: dict[str, int]  # feature -> categories not declared in the spec


def feature_names(spec: DataSpec) -> list[str]:
    names = [f.name for f in spec.numeric]
    for c in spec.categorical:
        names += [f"{c.name}={lvl}" for lvl in c.levels]
    return names


def prepare(df: pd.DataFrame, spec: DataSpec, source: str, need_target: bool = True) -> Prepared:
    """Turn a raw table into model inputs exactly as the spec declares."""
    missing = [f.name for f in (*spec.numeric, *spec.categorical) if f.name not in df.columns]
    if missing:
        raise FedcliError(f"{source} lacks columns the federation spec needs: {', '.join(missing)}")
    y = None
    dropped = 0
    if spec.target in df.columns:
        has_target = df[spec.target].notna()
        dropped = int((~has_target).sum())
        df = df[has_target]
        y = (df[spec.target].astype(str) == spec.positive).to_numpy(np.float32)
    elif need_target:
        raise FedcliError(f"{source} lacks the target column {spec.target!r}")
    if len(df) == 0:
        raise FedcliError(f"{source} has no usable rows")

    cols, filled, unknown = [], {}, {}
    for f in spec.numeric:
        values = pd.to_numeric(df[f.name], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            filled[f.name] = int(bad.sum())
            values = np.where(bad, f.mean, values)
        cols.append(((values - f.mean) / f.std)[:, None])
    for c in spec.categorical:
        raw = df[c.name]
        text = raw.astype(str).where(raw.notna(), None)
        onehot = np.stack([(text == lvl).to_numpy() for lvl in c.levels], axis=1).astype(np.float64)
        n_unknown = int((onehot.sum(axis=1) == 0).sum())
        if n_unknown:
            unknown[c.name] = n_unknown
        cols.append(onehot)
    X = np.concatenate(cols, axis=1).astype(np.float32)
    return Prepared(X=X, y=y, rows_dropped=dropped, filled=filled, unknown=unknown)


def infer_schema(df: pd.DataFrame, target: str, positive: str, max_levels: int = 30) -> dict:
    """Draft a [data] section from a table: only aggregate statistics (means, stds, level names)."""
    if target not in df.columns:
        raise FedcliError(f"target column {target!r} not in the table (columns: {', '.join(map(str, df.columns))})")
    numeric, categorical = [], []
    for col in df.columns:
        if col == target or col.lower() in ("rownames", "id", "index"):
            continue
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            std = float(s.std()) if s.notna().sum() > 1 else 1.0
            numeric.append({"name": str(col), "mean": round(float(s.mean()), 6), "std": round(std if std > 0 else 1.0, 6)})
        else:
            levels = [str(v) for v in s.dropna().astype(str).value_counts().index[:max_levels]]
            categorical.append({"name": str(col), "levels": sorted(levels)})
    return {"target": target, "positive": str(positive), "numeric": numeric, "categorical": categorical}
