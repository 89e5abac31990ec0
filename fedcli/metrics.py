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
"""

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from fedcli.errors import FedcliError

FPR_LIMITS = (0.001, 0.01)  # recall while at most 0.1 % / 1 % of the negatives are alerted
ALERT_RATES = (0.001, 0.01)  # precision when the team reviews the top 0.1 % / 1 % of rows
TABLE_ALERT_RATES = (0.001, 0.005, 0.01, 0.05)  # the threshold table's alert budgets
TABLE_SCORES = (0.5,)  # ...and its fixed score thresholds (0.5: what a plain classifier would flag)
# What a bank's update manifest reports, each as <key>_before (the global model it started from) and
# <key>_after (its locally trained model), on its own rows: status and report show them per round.
MANIFEST_METRICS = ("auc", "pr_auc", "recall_at_1pct_fpr")


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


@dataclass(frozen=True)
class Evaluation:
    """Everything `fedcli evaluate` shows: the headline metrics, the threshold table, and notes on
    any number that is n/a or means less than its name says."""

    rows: int
    positives: int
    metrics: dict[str, float]  # score()'s keys plus positive_rate
    table: list[OperatingPoint]  # highest threshold (fewest alerts) first
    notes: list[str] = field(default_factory=list)


def evaluation(y: np.ndarray, p: np.ndarray) -> Evaluation:
    """score(), the threshold table (alert budgets, the FPR limits, fixed scores) and its notes."""
    _finite(p)
    ranking = Ranking.of(y, p)
    rows = ranking.positives + ranking.negatives
    metrics = _score(ranking) | {"positive_rate": ranking.positives / rows if rows else math.nan}
    if not ranking.both_classes:
        note = f"only one class among the {rows:,} labels: AUC, PR-AUC, KS, recall and FPR need both (n/a)"
        return Evaluation(rows, ranking.positives, metrics, [], [note])
    table = [ranking.at_alerts(budget(r, rows), f"top {pct(r)}") for r in TABLE_ALERT_RATES]
    table += [ranking.at_fpr(a) for a in FPR_LIMITS]
    table += [ranking.at_score(s) for s in TABLE_SCORES]
    table.sort(key=lambda op: (op.alerts, -op.threshold))
    return Evaluation(rows, ranking.positives, metrics, table, _notes(ranking, rows))


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
