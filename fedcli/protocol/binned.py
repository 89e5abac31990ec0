"""Scores as binned counts, so banks can publish them and anyone can sum them into federation metrics.

A bank's holdout evaluation is not a list of scores (that would be its rows) but, per score bin, the
number of negatives and positives and three sums (of the scores, of the positives' scores, of the
squared scores). Bins are fixed by their count alone (equal widths in log-odds between -7 and 7, and
two open-ended bins beyond), so every bank bins alike and the histograms add up. Log-odds widths
keep resolution where a rare class (fraud, defaults) puts most of its rows: near 0.

From a histogram: ROC AUC, KS and PR-AUC are *approximate* (rows in one bin count as tied: AUC
counts a tied positive/negative pair as half, PR-AUC takes precision as linear across a bin); Brier score and ECE are
exact up to float rounding (the sums make the Brier score exact, ECE is defined on these bins).

Under DP a bank publishes only the two counts per bin, each with Gaussian noise (`noised`). A reader
sums the banks' noised counts first (the noise partly cancels), then `from_noised` clips negative
counts to 0 keeping their total (a least-squares projection), rounds them, and takes every row's score as its bin's centre (`centres`): every metric is then
computed exactly as above from that histogram, so it is approximate twice over (docs/report.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_HOLDOUT_ROWS = 50  # fewer holdout rows than this: nothing is published (a histogram of 5 rows nearly shows them)
LOGIT_LIMIT = 7.0  # sigmoid(7) = 0.99909: beyond, one open-ended bin each side


def edges(bins: int) -> np.ndarray:
    """The bins-1 inner edges, ascending in (0, 1); bin i holds scores in [edges[i-1], edges[i])."""
    z = np.linspace(-LOGIT_LIMIT, LOGIT_LIMIT, bins - 1)
    return 1.0 / (1.0 + np.exp(-z))


def bounds(bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's lowest and highest possible score (0 and 1 at the open ends)."""
    inner = edges(bins)
    return np.concatenate([[0.0], inner]), np.concatenate([inner, [1.0]])


def centres(bins: int) -> np.ndarray:
    """Each bin's representative score: the sigmoid of its log-odds midpoint (the open ends: half a width out)."""
    z = np.linspace(-LOGIT_LIMIT, LOGIT_LIMIT, bins - 1)
    width = z[1] - z[0]
    mid = np.concatenate([[z[0] - width / 2], (z[:-1] + z[1:]) / 2, [z[-1] + width / 2]])
    return 1.0 / (1.0 + np.exp(-mid))


def noised(negatives: np.ndarray, positives: np.ndarray, std: float, rng: np.random.Generator) -> dict:
    """The two count vectors with N(0, std^2) added to every entry: the published fields under DP.

    Each noise value is the sum of four standard normals halved (std 1), as privacy.noise draws them."""
    out = {}
    for name, counts in (("negatives", negatives), ("positives", positives)):
        noise = rng.standard_normal((4, len(counts))).sum(axis=0) / 2.0
        out[name] = [round(float(v), 3) for v in np.asarray(counts, dtype=np.float64) + std * noise]
    return out


def _nonnegative(x: np.ndarray) -> np.ndarray:
    """The closest (least squares) non-negative counts with the same total: max(x - t, 0) for the one t that keeps
    the sum (Duchi et al. 2008). Clipping alone would add about 0.4 noise stds to every empty bin, and with many
    empty bins that is many rows that do not exist."""
    total = float(x.sum())
    if total <= 0:
        return np.zeros_like(x)
    u = np.sort(x)[::-1]
    excess = np.cumsum(u) - total
    k = int(np.nonzero(u - excess / np.arange(1, len(u) + 1) > 0)[0][-1])
    return np.maximum(x - excess[k] / (k + 1), 0.0)


@dataclass(frozen=True)
class Histogram:
    """Per bin: negatives, positives, and the sums of scores, of positives' scores, of squared scores."""

    negatives: np.ndarray  # int64
    positives: np.ndarray  # int64
    score_sum: np.ndarray  # float64
    positive_score_sum: np.ndarray
    score_sq_sum: np.ndarray

    @property
    def bins(self) -> int:
        return len(self.negatives)

    @property
    def count(self) -> np.ndarray:
        return self.negatives + self.positives

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    @property
    def n_pos(self) -> int:
        return int(self.positives.sum())

    @property
    def n_neg(self) -> int:
        return int(self.negatives.sum())

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray, bins: int) -> Histogram:
        """Bin labels y (0/1) and scores p (finite, in [0, 1])."""
        y = np.asarray(y).ravel() != 0
        p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 0.0, 1.0)
        at = np.searchsorted(edges(bins), p, side="right")
        pos = np.bincount(at[y], minlength=bins)
        neg = np.bincount(at[~y], minlength=bins)
        return cls(
            neg.astype(np.int64),
            pos.astype(np.int64),
            np.bincount(at, weights=p, minlength=bins),
            np.bincount(at[y], weights=p[y], minlength=bins),
            np.bincount(at, weights=p * p, minlength=bins),
        )

    @classmethod
    def from_noised(cls, negatives: np.ndarray, positives: np.ndarray) -> Histogram:
        """A histogram from noised counts (summed over banks first): negatives clipped at 0 with the total kept,
        rounded, every row scored at its bin's centre. Post-processing only: it costs no privacy."""
        neg = np.rint(_nonnegative(np.asarray(negatives, dtype=np.float64))).astype(np.int64)
        pos = np.rint(_nonnegative(np.asarray(positives, dtype=np.float64))).astype(np.int64)
        c = centres(len(neg))
        n = (neg + pos).astype(np.float64)
        return cls(neg, pos, n * c, pos * c, n * c * c)

    @classmethod
    def total(cls, parts: list[Histogram]) -> Histogram:
        """The federation's histogram: the banks' summed (all with the same bins)."""
        return cls(*(np.sum([getattr(h, f) for h in parts], axis=0) for f in _FIELDS))

    def to_dict(self, digits: int = 6) -> dict:
        """The document's fields: counts as ints, sums rounded (the signed JSON stays small)."""
        out: dict = {"negatives": self.negatives.tolist(), "positives": self.positives.tolist()}
        for f in _FIELDS[2:]:
            out[f] = [round(float(v), digits) for v in getattr(self, f)]
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> Histogram:
        return cls(
            np.asarray(doc["negatives"], dtype=np.int64),
            np.asarray(doc["positives"], dtype=np.int64),
            *(np.asarray(doc[f], dtype=np.float64) for f in _FIELDS[2:]),
        )

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, float]:
        """auc, ks, pr_auc (approximate: ties within a bin), brier, ece, positive_rate; NaN when undefined."""
        rows = self.rows
        out = dict.fromkeys(("auc", "ks", "pr_auc", "brier", "ece", "positive_rate"), math.nan)
        if rows == 0:
            return out
        out["positive_rate"] = self.n_pos / rows
        out["brier"] = float((self.score_sq_sum.sum() - 2 * self.positive_score_sum.sum() + self.n_pos) / rows)
        count = self.count
        used = count > 0
        gap = np.abs(self.score_sum[used] - self.positives[used])  # |mean score - observed rate| x rows of the bin
        out["ece"] = float(gap.sum() / rows)
        if self.n_pos and self.n_neg:
            out |= self._ranking()
        return out

    def _ranking(self) -> dict[str, float]:
        pos, neg = self.positives.astype(np.float64), self.negatives.astype(np.float64)
        P, N = pos.sum(), neg.sum()
        neg_below = np.cumsum(neg) - neg
        auc = float(np.dot(pos, neg_below + 0.5 * neg) / (P * N))
        tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])  # alerting every bin from the top down to this one
        ks = float(np.max(tp / P - fp / N))
        alerted = tp + fp
        precision = np.divide(tp, alerted, out=np.zeros_like(tp), where=alerted > 0)
        # Within a bin the rows' order is unknown: precision is taken to move linearly from its value
        # before the bin to its value after (the first bin with rows starts at its own precision).
        started = np.concatenate([[0.0], alerted[:-1]]) > 0
        before = np.where(started, np.concatenate([[0.0], precision[:-1]]), precision)
        pr_auc = float(np.dot(pos[::-1], (precision + before) / 2) / P)
        return {"auc": auc, "ks": max(ks, 0.0), "pr_auc": pr_auc}

    def reliability(self, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean score, observed positive rate, rows) of each bin with at least min_rows rows."""
        count = self.count
        used = count >= max(min_rows, 1)
        return self.score_sum[used] / count[used], self.positives[used] / count[used], count[used]


_FIELDS = ("negatives", "positives", "score_sum", "positive_score_sum", "score_sq_sum")
HISTOGRAM_FIELDS = _FIELDS
