"""Scores risk teams read: ROC AUC, PR-AUC (average precision) and KS, and for rare events such as
fraud the operating points a review team actually runs at: recall at a fixed false-positive rate,
precision within an alert budget, and a threshold table.

One sort of the scores (and one of the positives' scores) gives every number, so a 10-million-row
table is sorted once, not once per metric, and beyond that sorted copy only arrays the size of the
positives are kept. Ties are handled one way throughout: an alert is a row whose score is at or
above a threshold, so rows with equal scores are alerted together (a tie is never split) and every
operating point is one a bank can set. ROC AUC counts a tied positive/negative pair as half;
PR-AUC is scikit-learn's average precision (a step sum over the distinct scores, no
interpolation); both equal scikit-learn's, which the tests check. Definitions and how to read
them: docs/fraud.md.

What a credit-risk validator signs off on top (docs/risk.md): calibration (Brier score, a reliability
table over 10 equal-width score bins and its ECE), the credit views (KS with the score where it is
reached, Gini = 2 AUC - 1, score bands with bad rates) and prior correction of the scores. Each is a
pure function of (labels, scores) so any caller (evaluate, a federated holdout round) gets the same
number.
"""

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from fedcli.errors import FedcliError, InputError

FPR_LIMITS = (0.001, 0.01)  # recall while at most 0.1 % / 1 % of the negatives are alerted
ALERT_RATES = (0.001, 0.01)  # precision when the team reviews the top 0.1 % / 1 % of rows
TABLE_ALERT_RATES = (0.001, 0.005, 0.01, 0.05)  # the threshold table's alert budgets
TABLE_SCORES = (0.5,)  # ...and its fixed score thresholds (0.5: what a plain classifier would flag)
# What a bank's update manifest reports, each as <key>_before (the global model it started from) and
# <key>_after (its locally trained model), on its own rows: status and report show them per round.
MANIFEST_METRICS = ("auc", "pr_auc", "recall_at_1pct_fpr")
CALIBRATION_BINS = 10  # the reliability table's equal-width score bins: [0, 0.1], (0.1, 0.2], ..., (0.9, 1]
SCORE_BANDS = 10  # the score-band table: deciles of rows by score, highest scores (riskiest) first


def pct(rate: float) -> str:
    """0.001 -> '0.1%': how a rate reads in a table."""
    return f"{rate * 100:g}%"


def recall_key(limit: float) -> str:
    return f"recall_at_{limit * 100:g}pct_fpr"


def precision_key(rate: float) -> str:
    return f"precision_at_top_{rate * 100:g}pct"


def budget(rate: float, rows: int) -> int:
    """Alerts allowed by an alert rate: the whole rows in rate x rows (a budget is never exceeded)."""
    return math.floor(rate * rows + 1e-9)


@dataclass(frozen=True)
class OperatingPoint:
    """Alert every row with score >= threshold: the counts a review team would see."""

    rule: str  # why this threshold: "top 1%", "FPR ≤ 0.1%", "score ≥ 0.5"
    threshold: float | np.floating  # a score, in the scores' own type (so it prints as they do); +inf: no alert
    tp: int
    fp: int
    positives: int
    negatives: int

    @property
    def alerts(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float:
        return self.tp / self.alerts if self.alerts else math.nan

    @property
    def recall(self) -> float:
        return self.tp / self.positives if self.positives else math.nan

    @property
    def fpr(self) -> float:
        return self.fp / self.negatives if self.negatives else math.nan


@dataclass(frozen=True)
class Ranking:
    """Every row's score and every positive's score, each sorted: the count of alerts and of true
    alerts at any threshold is then a binary search, and the metrics need only the distinct scores
    of the positives (a few thousand for a rare class), never an array per row beyond the sort."""

    scores: np.ndarray  # ascending, in the scores' own dtype (so a threshold prints as they do)
    positive_scores: np.ndarray  # ascending

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray) -> "Ranking":
        y, p = np.asarray(y).ravel(), np.asarray(p).ravel()
        if y.shape != p.shape:
            raise ValueError(f"{len(y)} labels for {len(p)} scores")
        return cls(np.sort(p), np.sort(p[y != 0]))

    @property
    def positives(self) -> int:
        return len(self.positive_scores)

    @property
    def negatives(self) -> int:
        return len(self.scores) - len(self.positive_scores)

    @property
    def both_classes(self) -> bool:
        return self.positives > 0 and self.negatives > 0

    def counts(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(alerts, true alerts) when alerting every row scored >= each threshold in `at`."""
        alerts = len(self.scores) - np.searchsorted(self.scores, at, side="left")
        return alerts, self.positives - np.searchsorted(self.positive_scores, at, side="left")

    def point(self, rule: str, threshold) -> OperatingPoint:
        alerts, tp = self.counts(np.asarray([threshold], dtype=self.scores.dtype))
        if threshold == math.inf:
            threshold = math.inf  # a plain float, however the scores are typed
        return OperatingPoint(rule, threshold, int(tp[0]), int(alerts[0] - tp[0]), self.positives, self.negatives)

    @cached_property
    def _steps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """At each distinct score a positive has, highest first: the score, the true and false alerts
        at or above it, and how many positives and negatives have exactly that score (its ties).
        Between two of these only negatives are added, so every ranking metric is a sum over them."""
        at = np.unique(self.positive_scores)[::-1]
        alerts, tp = self.counts(at)
        tied = np.searchsorted(self.scores, at, side="right") - np.searchsorted(self.scores, at, side="left")
        tied_pos = np.searchsorted(self.positive_scores, at, side="right") - (self.positives - tp)
        return at, tp, alerts - tp, tied_pos, tied - tied_pos

    def roc_auc(self) -> float:
        """Each positive's share of negatives scored below it, a tied negative counting half."""
        _, _, fp, tied_pos, tied_neg = self._steps
        below = self.negatives - fp + 0.5 * tied_neg
        return float(np.dot(tied_pos, below) / (self.positives * self.negatives))

    def average_precision(self) -> float:
        """scikit-learn's: the precision at each distinct score, weighted by the recall it adds."""
        _, tp, fp, tied_pos, _ = self._steps
        return float(np.dot(tied_pos, tp / (tp + fp)) / self.positives)

    def ks(self) -> float:
        _, tp, fp, _, _ = self._steps
        return float(max(0.0, np.max(tp / self.positives - fp / self.negatives)))

    def at_fpr(self, limit: float) -> OperatingPoint:
        """The best recall while the false-positive rate stays <= limit, at the highest threshold
        that reaches it (a lower one would only add false alerts)."""
        rule = f"FPR ≤ {pct(limit)}"
        at, _, fp, _, _ = self._steps
        within = np.flatnonzero(fp / max(self.negatives, 1) <= limit)  # a prefix: fp only grows
        return self.point(rule, at[within[-1]] if len(within) else math.inf)

    def at_alerts(self, k: int, rule: str) -> OperatingPoint:
        """The most alerts that fit a budget of k rows: fewer when the scores at its edge are tied."""
        n = len(self.scores)
        if k <= 0 or n == 0:
            return self.point(rule, math.inf)
        edge = self.scores[max(n - k, 0)]  # the k-th highest score
        if n - np.searchsorted(self.scores, edge, side="left") > k:  # its ties overflow the budget
            above = np.searchsorted(self.scores, edge, side="right")
            edge = self.scores[above] if above < n else math.inf
        return self.point(rule, edge)

    def at_score(self, threshold: float) -> OperatingPoint:
        return self.point(f"score ≥ {threshold:g}", threshold)


def _finite(p: np.ndarray) -> None:
    """Scores that are not finite mean the model itself is broken (weights overflowed): refused
    here, so a NaN never reaches a manifest or a table."""
    if not np.all(np.isfinite(p)):
        raise FedcliError(
            f"the model's scores are not finite ({int(np.sum(~np.isfinite(p)))} of {len(p)} rows): "
            "its weights overflowed",
            reason="not-finite",
        )


def _score(ranking: Ranking) -> dict[str, float]:
    keys = ["auc", "pr_auc", "ks", *map(recall_key, FPR_LIMITS), *map(precision_key, ALERT_RATES)]
    if not ranking.both_classes:
        return dict.fromkeys(keys, math.nan)
    rows = ranking.positives + ranking.negatives
    return {
        "auc": ranking.roc_auc(),
        "pr_auc": ranking.average_precision(),
        "ks": ranking.ks(),
        **{recall_key(a): ranking.at_fpr(a).recall for a in FPR_LIMITS},
        **{precision_key(r): ranking.at_alerts(budget(r, rows), "").precision for r in ALERT_RATES},
    }


def score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Metrics for labels y (0/1) and scores p; NaN where a metric needs both classes (or, for
    precision in the top r, at least one alert: too few rows, or a tie wider than the budget).

    auc, pr_auc, ks; recall_at_0.1pct_fpr and recall_at_1pct_fpr; precision_at_top_0.1pct and
    precision_at_top_1pct (the top r of rows by score, r x rows rounded down).
    """
    _finite(p)
    return _score(Ranking.of(y, p))


# --------------------------------------------------------------------------- calibration and credit views


CHUNK = 1 << 20  # rows per step of the calibration sums: their memory stays ~40 MB at any table size


def _pair(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (nonzero = positive) and finite scores, flat and of the same length (else ValueError /
    not-finite); not copied: the sums below convert a chunk at a time."""
    y, p = np.asarray(y).ravel(), np.asarray(p).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels for {len(p)} scores")
    _finite(p)
    return y, p


def _chunks(y: np.ndarray, p: np.ndarray):
    """(labels as 0/1 float64, scores as float64) a chunk of rows at a time."""
    for start in range(0, len(y), CHUNK):
        yield (y[start : start + CHUNK] != 0).astype(np.float64), p[start : start + CHUNK].astype(np.float64)


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """brier_score(labels 0/1, scores in [0, 1]) -> mean squared gap between score and outcome.

    0 is perfect; a model that always says the base rate b scores b(1 - b). NaN for no rows."""
    return _brier(*_pair(y, p))


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    if not len(y):
        return math.nan
    total = 0.0
    for yc, pc in _chunks(y, p):
        gap = pc - yc
        total += float(np.dot(gap, gap))
    return total / len(y)


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width score bin: rows whose score is in (low, high] (the first bin also takes 0)."""

    low: float
    high: float
    rows: int
    mean_score: float  # what the model promised on average (NaN for an empty bin)
    observed_rate: float  # the share of positives among those rows (NaN for an empty bin)

    @property
    def gap(self) -> float:
        return self.observed_rate - self.mean_score


def reliability(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> list[ReliabilityBin]:
    """reliability(labels, scores, bins=10) -> one ReliabilityBin per equal-width bin of [0, 1], empty ones too.

    Binned as scikit-learn's calibration_curve(strategy="uniform"): bin i holds the scores in
    (i/bins, (i+1)/bins], the first also 0."""
    return _reliability(*_pair(y, p), bins)


def _reliability(y: np.ndarray, p: np.ndarray, bins: int) -> list[ReliabilityBin]:
    return calibration_sums(y, p, bins).table()


@dataclass(frozen=True)
class CalibrationSums:
    """Per equal-width bin: rows, the sum of their scores and their positives; and the sum of squared
    gaps (Brier's numerator). Every field is a sum over rows, so the sums of several banks add up
    (`merge`, e.g. through secure aggregation) to the sums of their pooled rows, and `calibration()`
    of the merged sums is the calibration of the pooled table."""

    rows: tuple[int, ...]
    score_sums: tuple[float, ...]
    positives: tuple[float, ...]
    squared_error: float

    def merge(self, other: "CalibrationSums") -> "CalibrationSums":
        if len(self.rows) != len(other.rows):
            raise ValueError(f"{len(self.rows)} bins against {len(other.rows)}")
        return CalibrationSums(
            tuple(a + b for a, b in zip(self.rows, other.rows, strict=True)),
            tuple(a + b for a, b in zip(self.score_sums, other.score_sums, strict=True)),
            tuple(a + b for a, b in zip(self.positives, other.positives, strict=True)),
            self.squared_error + other.squared_error,
        )

    def table(self) -> list[ReliabilityBin]:
        bins = len(self.rows)
        edges = np.linspace(0.0, 1.0, bins + 1)
        out = []
        for i, n in enumerate(self.rows):
            mean, rate = (self.score_sums[i] / n, self.positives[i] / n) if n else (math.nan, math.nan)
            out.append(ReliabilityBin(float(edges[i]), float(edges[i + 1]), int(n), float(mean), float(rate)))
        return out

    def calibration(self) -> "Calibration":
        table, n = self.table(), sum(self.rows)
        if not n:
            return Calibration(math.nan, math.nan, table, math.nan, math.nan)
        return Calibration(
            self.squared_error / n, _ece(table), table, sum(self.score_sums) / n, sum(self.positives) / n
        )


def calibration_sums(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> CalibrationSums:
    """calibration_sums(labels, scores, bins=10) -> the additive sums behind calibration() (one pass,
    a chunk of rows at a time)."""
    y, p = _pair(y, p)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows, sums, positives = np.zeros(bins, np.int64), np.zeros(bins), np.zeros(bins)
    squared = 0.0
    for yc, pc in _chunks(y, p):
        ids = np.searchsorted(edges[1:-1], pc)
        rows += np.bincount(ids, minlength=bins)
        sums += np.bincount(ids, weights=pc, minlength=bins)
        positives += np.bincount(ids, weights=yc, minlength=bins)
        gap = pc - yc
        squared += float(np.dot(gap, gap))
    return CalibrationSums(tuple(rows.tolist()), tuple(sums.tolist()), tuple(positives.tolist()), squared)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """expected_calibration_error(labels, scores, bins=10) -> sum over the equal-width bins of
    (rows in bin / rows) x |observed rate - mean score|: the average distance between what the model
    promised and what happened, in probability points. NaN for no rows."""
    return _ece(reliability(y, p, bins))


def _ece(table: list[ReliabilityBin]) -> float:
    total = sum(b.rows for b in table)
    if not total:
        return math.nan
    return float(sum(b.rows * abs(b.gap) for b in table if b.rows) / total)


def gini(y: np.ndarray, p: np.ndarray) -> float:
    """gini(labels, scores) -> 2 AUC - 1 (the accuracy ratio credit teams quote); NaN without both classes."""
    return _gini(Ranking.of(*_pair(y, p)))


def _gini(ranking: Ranking) -> float:
    return 2 * ranking.roc_auc() - 1 if ranking.both_classes else math.nan


def ks_threshold(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """ks_threshold(labels, scores) -> (KS, score): the largest gap between the shares of positives and of
    negatives scored at or above a threshold, and the (highest) threshold where it is reached. This KS
    is the one-sided two-sample Kolmogorov-Smirnov statistic (positives scored higher; a model that
    ranks backwards has KS 0, not 1). (NaN, NaN) without both classes."""
    return _ks(Ranking.of(*_pair(y, p)))


def _ks(ranking: Ranking) -> tuple[float, float]:
    if not ranking.both_classes:
        return math.nan, math.nan
    at, tp, fp, _, _ = ranking._steps
    gaps = tp / ranking.positives - fp / ranking.negatives
    best = int(np.argmax(gaps))
    return float(max(0.0, gaps[best])), float(at[best])


@dataclass(frozen=True)
class ScoreBand:
    """Rows scored in [low, high]; bands are listed highest scores first, so cumulative = "from the top"."""

    band: int  # 1 = the highest scores
    low: float
    high: float
    rows: int
    positives: int  # bads
    cum_rows: int
    cum_positives: int
    total_rows: int
    total_positives: int

    @property
    def bad_rate(self) -> float:
        return self.positives / self.rows

    @property
    def cum_bad_rate(self) -> float:
        return self.cum_positives / self.cum_rows

    @property
    def cum_share_of_rows(self) -> float:
        return self.cum_rows / self.total_rows

    @property
    def cum_share_of_bads(self) -> float:
        """The capture rate: the share of all positives in this band and the ones above it."""
        return self.cum_positives / self.total_positives if self.total_positives else math.nan


def score_bands(y: np.ndarray, p: np.ndarray, bands: int = SCORE_BANDS) -> list[ScoreBand]:
    """score_bands(labels, scores, bands=10) -> quantile bands of rows by score, highest first.

    Band k ends at the score of the row ranked ceil(k x rows / bands) from the top; a tie is never
    split (tied rows all go to the higher band), so bands can be uneven and a band swallowed by a tie
    is left out. Every row is in exactly one band."""
    return _bands(Ranking.of(*_pair(y, p)), bands)


def _bands(ranking: Ranking, bands: int) -> list[ScoreBand]:
    s, n = ranking.scores, len(ranking.scores)
    if not n:
        return []
    ranks = [math.ceil(k * n / bands) for k in range(1, bands + 1)]
    cuts = np.array([s[n - r] for r in ranks], dtype=s.dtype)  # rows scored >= cut: the top k bands
    alerts, tp = ranking.counts(cuts)
    out: list[ScoreBand] = []
    prev_rows = prev_pos = 0
    high = s[-1]
    for cut, a, t in zip(cuts, alerts.tolist(), tp.tolist(), strict=True):
        if a == prev_rows:
            continue  # this band's rows were all tied with the band above
        band = ScoreBand(len(out) + 1, float(cut), float(high), a - prev_rows, t - prev_pos, a, t, n, ranking.positives)
        out.append(band)
        prev_rows, prev_pos = a, t
        below = np.searchsorted(s, cut, side="left")
        high = s[below - 1] if below else cut
    return out


@dataclass(frozen=True)
class Calibration:
    """How far the scores are from probabilities: docs/risk.md."""

    brier: float
    ece: float
    bins: list[ReliabilityBin]
    mean_score: float
    positive_rate: float


@dataclass(frozen=True)
class CreditView:
    """KS (and where), Gini and the score bands: what a credit validator reads first."""

    ks: float
    ks_score: float  # rows scored at or above this are where KS is reached
    gini: float
    bands: list[ScoreBand]


def calibration(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> Calibration:
    """calibration(labels, scores, bins=10) -> Brier, ECE, the reliability table, mean score against positive rate."""
    return calibration_sums(y, p, bins).calibration()


def credit_view(y: np.ndarray, p: np.ndarray, bands: int = SCORE_BANDS) -> CreditView:
    """credit_view(labels, scores, bands=10) -> KS with its score, Gini and the score bands."""
    return _credit(Ranking.of(*_pair(y, p)), bands)


def _credit(ranking: Ranking, bands: int = SCORE_BANDS) -> CreditView:
    ks, at = _ks(ranking)
    return CreditView(ks, at, _gini(ranking), _bands(ranking, bands))


# --------------------------------------------------------------------------- prior correction


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64; scores of exactly 0 or 1 give -inf / +inf."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64 without overflow warnings."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.where(z >= 0, 1 / (1 + np.exp(-z)), np.exp(z) / (1 + np.exp(z)))


def odds(rate: float) -> float:
    return rate / (1 - rate)


def prior_shift(pos_weight: float = 1.0, base_rate: float | None = None, train_rate: float | None = None) -> float:
    """prior_shift(pos_weight, base_rate, train_rate) -> the number to add to every logit.

    Training with the positives weighted w multiplies the odds the weighted loss is minimised by
    by w: -log(w) undoes it (exactly where the model can represent the true odds). A population whose positive rate is base_rate instead of the train_rate the model saw
    (after undoing w) multiplies the odds by odds(base_rate) / odds(train_rate): +log of that."""
    if not (pos_weight > 0 and math.isfinite(pos_weight)):
        raise InputError(f"pos_weight must be a positive number, not {pos_weight}")
    shift = -math.log(pos_weight)
    if base_rate is None and train_rate is None:
        return shift
    if base_rate is None or train_rate is None:
        raise InputError(
            "prior correction needs both --base-rate (the population's positive rate) and --train-rate "
            "(the positive rate of the rows the model was trained on)",
        )
    for name, rate in (("base rate", base_rate), ("train rate", train_rate)):
        if not 0 < rate < 1:
            raise InputError(f"the {name} must be strictly between 0 and 1, not {rate:g}")
    return shift + math.log(odds(base_rate) / odds(train_rate))


def shift_scores(p: np.ndarray, shift: float) -> np.ndarray:
    """Scores with `shift` added to their logit (a no-op for shift 0), in the scores' own dtype."""
    p = np.asarray(p)
    if shift == 0:
        return p
    return sigmoid(logit(p) + shift).astype(p.dtype, copy=False)


@dataclass(frozen=True)
class PriorCorrection:
    """A requested recalibration of the scores (evaluate/predict --undo-pos-weight, --base-rate with --train-rate).

    A base rate always undoes the spec's pos_weight too: the train rate is the share of positives
    in the training rows, and the weighted model learned odds pos_weight times theirs."""

    undo_pos_weight: bool = False
    base_rate: float | None = None
    train_rate: float | None = None

    def shift(self, pos_weight: float) -> float:
        """The logit shift for a model trained with this pos_weight."""
        if not self.undo_pos_weight and self.base_rate is None and self.train_rate is None:
            return 0.0
        return prior_shift(pos_weight, self.base_rate, self.train_rate)

    def describe(self, pos_weight: float) -> str:
        """What was done, in one line (printed by evaluate and predict, written into evaluate's JSON)."""
        parts = [f"pos_weight {pos_weight:g} undone"] if pos_weight != 1 else ["pos_weight is 1: nothing to undo"]
        if self.base_rate is not None:
            parts.append(f"base rate {self.base_rate:g} against train rate {self.train_rate:g}")
        return f"logit shift {self.shift(pos_weight):+.6g} ({'; '.join(parts)})"


@dataclass(frozen=True)
class Evaluation:
    """Everything `fedcli evaluate` shows: the headline metrics, the threshold table, and notes on
    any number that is n/a or means less than its name says."""

    rows: int
    positives: int
    metrics: dict[str, float]  # score()'s keys plus positive_rate
    table: list[OperatingPoint]  # highest threshold (fewest alerts) first
    notes: list[str] = field(default_factory=list)
    calibration: Calibration | None = None  # None: no rows
    credit: CreditView | None = None  # None: only one class among the labels


def evaluation(y: np.ndarray, p: np.ndarray) -> Evaluation:
    """score(), the threshold table (alert budgets, the FPR limits, fixed scores) and its notes."""
    _finite(p)
    ranking = Ranking.of(y, p)
    rows = ranking.positives + ranking.negatives
    metrics = _score(ranking) | {"positive_rate": ranking.positives / rows if rows else math.nan}
    calib = calibration(y, p) if rows else None
    if not ranking.both_classes:
        note = f"only one class among the {rows:,} labels: AUC, PR-AUC, KS, recall and FPR need both (n/a)"
        return Evaluation(rows, ranking.positives, metrics, [], [note], calib)
    table = [ranking.at_alerts(budget(r, rows), f"top {pct(r)}") for r in TABLE_ALERT_RATES]
    table += [ranking.at_fpr(a) for a in FPR_LIMITS]
    table += [ranking.at_score(s) for s in TABLE_SCORES]
    table.sort(key=lambda op: (op.alerts, -op.threshold))
    notes = _notes(ranking, rows)
    return Evaluation(rows, ranking.positives, metrics, table, notes, calib, _credit(ranking))


def _notes(ranking: Ranking, rows: int) -> list[str]:
    """Where an operating point is not what its name promises: too few rows or negatives, or ties."""
    notes = []
    for a in FPR_LIMITS:
        if a * ranking.negatives < 1:
            notes.append(
                f"FPR ≤ {pct(a)}: {ranking.negatives:,} negatives allow less than one false alert, "
                "so this is the recall with no false alert at all"
            )
    for r in sorted({*ALERT_RATES, *TABLE_ALERT_RATES}):
        k = budget(r, rows)
        got = ranking.at_alerts(k, "").alerts
        if k == 0:
            notes.append(f"top {pct(r)}: {rows:,} rows give a budget of less than one alert (n/a)")
        elif got < k:
            notes.append(
                f"top {pct(r)}: {got:,} alerts, not {k:,}: the scores at the edge of the budget are tied "
                "and a tie is never split"
            )
    return notes


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined metric is null."""
    return None if value != value else float(value)


def evaluation_json(ev: Evaluation) -> dict:
    """Everything in an Evaluation as plain JSON types (NaN -> null); evaluate --out writes it."""
    doc: dict = {
        "rows": ev.rows,
        "positives": ev.positives,
        "metrics": {k: _number(v) for k, v in ev.metrics.items()},
        "operating_points": [
            {
                "rule": op.rule,
                "threshold": None if op.threshold == math.inf else float(op.threshold),
                "alerts": op.alerts,
                "tp": op.tp,
                "fp": op.fp,
                "precision": _number(op.precision),
                "recall": _number(op.recall),
                "fpr": _number(op.fpr),
            }
            for op in ev.table
        ],
        "notes": list(ev.notes),
        "calibration": None,
        "credit": None,
    }
    if ev.calibration is not None:
        c = ev.calibration
        doc["calibration"] = {
            "brier": _number(c.brier),
            "ece": _number(c.ece),
            "ece_bins": f"{len(c.bins)} equal-width bins of [0, 1]",
            "mean_score": _number(c.mean_score),
            "positive_rate": _number(c.positive_rate),
            "reliability": [
                {
                    "low": b.low,
                    "high": b.high,
                    "rows": b.rows,
                    "mean_score": _number(b.mean_score),
                    "observed_rate": _number(b.observed_rate),
                }
                for b in c.bins
            ],
        }
    if ev.credit is not None:
        k = ev.credit
        doc["credit"] = {
            "ks": _number(k.ks),
            "ks_score": _number(k.ks_score),
            "gini": _number(k.gini),
            "bands": [
                {
                    "band": b.band,
                    "low": b.low,
                    "high": b.high,
                    "rows": b.rows,
                    "bads": b.positives,
                    "bad_rate": b.bad_rate,
                    "cum_rows": b.cum_rows,
                    "cum_bads": b.cum_positives,
                    "cum_bad_rate": b.cum_bad_rate,
                    "cum_share_of_bads": _number(b.cum_share_of_bads),
                }
                for b in k.bands
            ],
        }
    return doc
