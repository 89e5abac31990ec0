"""A logistic global model as the points table a credit team reads (docs/risk.md, "Scorecard").

A logistic model's log-odds are a sum, one term per input, so they convert exactly into points:
with factor = PDO / ln 2 and offset = base score - factor x ln(base odds),

    score = offset + factor x ln(good:bad odds) = offset - factor x logit

where logit is the model's log-odds of the positive ("bad") class. A higher score is a lower risk;
the score is `base_score` where the good:bad odds are `base_odds`, and every `pdo` points double
them. The spec's standardisation is folded in: a numeric feature earns `per_unit x (x - mean)`
points (0 at the declared mean, which is also what a missing value gets), a categorical feature
the points of its level (0 for a level the spec does not declare). The intercept and nothing else
is in the base points. Summing a row's points reproduces the model's score exactly (the tests
check 1e-9 on real rows, against the weights in float64).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedcli.errors import InputError

BAND_STDS = (-1, 0, 1)  # numeric band edges: the declared mean plus these many declared stds


@dataclass(frozen=True)
class Band:
    """Points of a numeric feature at the two ends of a range of raw values (linear in between)."""

    low: float  # -inf: open below
    high: float  # +inf: open above
    points_at_low: float | None  # None at an open end
    points_at_high: float | None


@dataclass(frozen=True)
class NumericPoints:
    feature: str
    mean: float
    std: float
    weight: float  # the model's weight on the standardised feature
    per_unit: float  # points per unit of the raw value
    bands: list[Band]

    def points(self, value: float) -> float:
        """Points for a raw value; a missing one (NaN) is filled with the mean, so 0."""
        return 0.0 if math.isnan(value) else self.per_unit * (value - self.mean)


@dataclass(frozen=True)
class CategoricalPoints:
    feature: str
    levels: dict[str, float]  # level -> points; any other (or missing) value: 0

    def points(self, value: str | None) -> float:
        return self.levels.get(value, 0.0) if value is not None else 0.0


@dataclass(frozen=True)
class Scorecard:
    pdo: float
    base_score: float
    base_odds: float
    factor: float
    offset: float
    base_points: float  # the score of a row at every mean with no declared level
    numeric: list[NumericPoints]
    categorical: list[CategoricalPoints]

    def score(self, numeric: dict[str, float], categorical: dict[str, str | None]) -> float:
        """One row's score: the base points plus each feature's points (missing values score 0)."""
        total = self.base_points
        total += sum(f.points(float(numeric.get(f.feature, math.nan))) for f in self.numeric)
        return total + sum(f.points(categorical.get(f.feature)) for f in self.categorical)

    def from_logit(self, logit: float) -> float:
        return self.offset - self.factor * logit


def check_scaling(pdo: float, base_score: float, base_odds: float) -> None:
    for name, value in (("--pdo", pdo), ("--base-odds", base_odds)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a positive number, not {value:g}")
    if not math.isfinite(base_score):
        raise InputError(f"--base-score must be a finite number, not {base_score:g}")


def build(
    spec,
    tensors: dict[str, np.ndarray],
    pdo: float = 20,
    base_score: float = 600,
    base_odds: float = 50,
    shift: float = 0.0,
):
    """The scorecard of a logistic model (spec: protocol.spec.Spec; tensors: the verified global's); `shift`
    is a prior correction added to the logit (metrics.PriorCorrection), so it lands in the base points."""
    if spec.model.kind != "logreg":
        raise InputError(
            f"the global model is an {spec.model.kind}: points per attribute exist only for a logistic "
            'model ([model] kind = "logreg"); export it with `fedcli export` instead'
        )
    check_scaling(pdo, base_score, base_odds)
    weights = np.asarray(tensors["0.weight"], dtype=np.float64).ravel()
    bias = float(np.asarray(tensors["0.bias"], dtype=np.float64).ravel()[0]) + shift
    factor = pdo / math.log(2)
    offset = base_score - factor * math.log(base_odds)
    numeric, j = [], 0
    for f in spec.data.numeric:
        w = float(weights[j])
        per_unit = -factor * w / f.std
        numeric.append(NumericPoints(f.name, f.mean, f.std, w, per_unit, _bands(f.mean, f.std, per_unit)))
        j += 1
    categorical = []
    for c in spec.data.categorical:
        levels = {lvl: -factor * float(weights[j + i]) for i, lvl in enumerate(c.levels)}
        categorical.append(CategoricalPoints(c.name, levels))
        j += len(c.levels)
    card = Scorecard(pdo, base_score, base_odds, factor, offset, offset - factor * bias, numeric, categorical)
    _check_finite(card)
    return card


def _check_finite(card: Scorecard) -> None:
    """Finite weights can still give infinite points (a tiny declared std, an extreme PDO): refused, so no
    file ever holds inf or NaN."""
    values = [card.base_points, *(f.per_unit for f in card.numeric)]
    values += [v for c in card.categorical for v in c.levels.values()]
    if not all(math.isfinite(v) for v in values):
        raise InputError("the scorecard's points overflow (a weight over a tiny declared std, or an extreme --pdo)")


def _bands(mean: float, std: float, per_unit: float) -> list[Band]:
    edges = [-math.inf, *(mean + k * std for k in BAND_STDS), math.inf]
    out = []
    for low, high in zip(edges, edges[1:], strict=False):
        at = [None if math.isinf(v) else per_unit * (v - mean) + 0.0 for v in (low, high)]  # + 0.0: no -0
        out.append(Band(low, high, at[0], at[1]))
    return out


# --------------------------------------------------------------------------- files


COLUMNS = ("feature", "kind", "attribute", "points", "points_at_low", "points_at_high")


def rows(card: Scorecard) -> list[dict]:
    """One row per attribute, as the CSV has them: the base points; per numeric feature its points per
    unit and its bands (points at each end, linear in between); per categorical feature its levels."""
    out: list[dict] = [{"feature": "(base)", "kind": "base", "attribute": "every row", "points": card.base_points}]
    for f in card.numeric:
        out.append({"feature": f.feature, "kind": "per_unit", "attribute": f"x - {f.mean:g}", "points": f.per_unit})
        for b in f.bands:
            span = f"[{_num(b.low)}, {_num(b.high)})"
            ends = {"points_at_low": b.points_at_low, "points_at_high": b.points_at_high}
            out.append({"feature": f.feature, "kind": "band", "attribute": span} | ends)
    for c in card.categorical:
        for level, points in c.levels.items():
            out.append({"feature": c.feature, "kind": "level", "attribute": level, "points": points})
        out.append({"feature": c.feature, "kind": "other", "attribute": "(undeclared or missing)", "points": 0.0})
    return out


def _num(value: float) -> str:
    return "-inf" if value == -math.inf else "+inf" if value == math.inf else f"{value:.6g}"


def to_json(card: Scorecard, about: dict) -> bytes:
    doc = {
        **about,
        "formula": "score = base_points + sum(per_unit x (x - mean)) over numeric features (missing: 0) "
        "+ sum(points of the row's level) over categorical features (undeclared or missing: 0); "
        "score = offset - factor x logit(P(bad)) with factor = pdo / ln 2, offset = base_score - factor x ln(base_odds)",
        **{k: v for k, v in asdict(card).items() if k not in ("numeric", "categorical")},
        "numeric": [
            {**{k: v for k, v in asdict(f).items() if k != "bands"}, "bands": [_band_json(b) for b in f.bands]}
            for f in card.numeric
        ],
        "categorical": [asdict(c) | {"other_points": 0.0} for c in card.categorical],
    }
    return (json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _band_json(b: Band) -> dict:
    return {
        "low": None if math.isinf(b.low) else b.low,
        "high": None if math.isinf(b.high) else b.high,
        "points_at_low": b.points_at_low,
        "points_at_high": b.points_at_high,
    }


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula


def _cell(value) -> str:
    """A CSV cell: floats with every digit; text from the spec that a spreadsheet would take for a
    formula gets a leading quote (a level named "=HYPERLINK(...)" stays text)."""
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return ""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(card: Scorecard) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows(card):
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return text.getvalue().encode()


def write(card: Scorecard, path: Path, about: dict) -> None:
    """The scorecard as CSV or JSON, by the file's suffix; atomically."""
    from fedcli.files import write_atomic

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise InputError(f"--out {path}: name a .csv or a .json file")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: no folder {path.parent}")
    data = to_csv(card) if suffix == ".csv" else to_json(card, about)
    try:
        write_atomic(path, data, f".{path.name}.")
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def load(store, coordinator_pub: Path, round_: int | None, pdo: float, base_score: float, base_odds: float, prior=None):
    """(scorecard, about) of the verified global model (the checks `fedcli predict` makes), optionally
    prior-corrected (a metrics.PriorCorrection)."""
    from fedcli.bank.inference import verified_global

    check_scaling(pdo, base_score, base_odds)
    spec, g, _fresh = verified_global(store, coordinator_pub, round_)
    shift = prior.shift(spec.training.pos_weight) if prior is not None else 0.0
    card = build(spec, g.tensors, pdo, base_score, base_odds, shift)
    about = {
        "federation_id": spec.federation_id,
        "round": g.round,
        "tensors_sha256": g.sha256,
        "target": spec.data.target,
        "positive": spec.data.positive,
        "odds": "good:bad, bad = the positive class; a higher score is a lower risk",
        "prior_correction": prior.describe(spec.training.pos_weight) if prior is not None else None,
    }
    return card, about
