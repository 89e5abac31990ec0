"""Rare-event metrics: each against scikit-learn or a brute-force reference (ties included), and
where they show: evaluate, the update manifests, status and report."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from fedcli.errors import FedcliError
from fedcli.metrics import (
    ALERT_RATES,
    FPR_LIMITS,
    Curve,
    budget,
    evaluation,
    precision_key,
    recall_key,
    score,
)

# --------------------------------------------------------------------------- references


def brute_points(y: np.ndarray, p: np.ndarray) -> list[tuple[float, int, int]]:
    """(threshold, tp, fp) for every threshold a bank could set: each distinct score, and +inf (no alert)."""
    points = [(math.inf, 0, 0)]
    for t in sorted(set(p.tolist()), reverse=True):
        flagged = p >= t
        points.append((t, int(np.sum(flagged & (y == 1))), int(np.sum(flagged & (y == 0)))))
    return points


def brute_recall_at_fpr(y, p, limit) -> float:
    negatives = int(np.sum(y == 0))
    return max(tp for _, tp, fp in brute_points(y, p) if fp / negatives <= limit) / int(np.sum(y == 1))


def brute_precision_at_top(y, p, k) -> float:
    fitting = [(tp + fp, tp) for _, tp, fp in brute_points(y, p) if 0 < tp + fp <= k]
    if not fitting:
        return math.nan
    alerts, tp = max(fitting)
    return tp / alerts


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# hypothesis: small tables with heavy ties (scores on a coarse grid) and both classes
tables = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < n),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
    )
)


def arrays(drawn) -> tuple[np.ndarray, np.ndarray]:
    y, grid = drawn
    return np.array(y, dtype=np.float32), np.array(grid, dtype=np.float32) / 6


# --------------------------------------------------------------------------- against references


@given(tables)
def test_auc_pr_auc_ks_equal_scikit_learn_with_ties(drawn):
    y, p = arrays(drawn)
    got = score(y, p)
    assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, p)
    assert got["ks"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)


@given(tables, st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0]))
def test_recall_at_fpr_is_the_best_threshold_within_the_limit(drawn, limit):
    y, p = arrays(drawn)
    got = Curve.of(y, p).at_fpr(limit).recall
    assert got == pytest.approx(brute_recall_at_fpr(y, p, limit), abs=1e-12)
    # the same as reading scikit-learn's full ROC curve (no interpolation between thresholds)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    assert got == pytest.approx(np.max(tpr[fpr <= limit]), abs=1e-12)


@given(tables, st.integers(0, 70))
def test_precision_at_top_k_never_exceeds_the_budget_and_never_splits_a_tie(drawn, k):
    y, p = arrays(drawn)
    point = Curve.of(y, p).at_alerts(k, f"top {k}")
    assert point.alerts <= k
    assert same(point.precision, brute_precision_at_top(y, p, k))
    assert point.alerts == int(np.sum(p >= point.threshold))  # a threshold, so whole ties or none


@given(tables)
def test_every_row_of_the_threshold_table_is_a_threshold_a_bank_can_set(drawn):
    y, p = arrays(drawn)
    ev = evaluation(y, p)
    assert ev.table and [op.alerts for op in ev.table] == sorted(op.alerts for op in ev.table)
    for op in ev.table:
        flagged = p >= op.threshold
        tn, fp, fn, tp = confusion_matrix(y, flagged, labels=[0, 1]).ravel()
        assert (op.tp, op.fp, op.alerts) == (tp, fp, tp + fp), op
        assert same(op.precision, tp / (tp + fp) if tp + fp else math.nan)
        assert op.recall == tp / (tp + fn) and op.fpr == fp / (fp + tn)


def test_headline_metrics_are_rows_of_the_table_and_match_references_on_a_realistic_sample():
    rng = np.random.default_rng(7)
    y = (rng.random(20_000) < 0.004).astype(np.float32)  # about 80 frauds, as rare as card fraud
    p = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 2.5 * y)))
    p = np.round(p, 3).astype(np.float32)  # coarse scores: ties at every threshold
    ev = evaluation(y, p)
    rules = {op.rule: op for op in ev.table}
    assert set(rules) == {"top 0.1%", "top 0.5%", "top 1%", "top 5%", "FPR ≤ 0.1%", "FPR ≤ 1%", "score ≥ 0.5"}
    for limit in FPR_LIMITS:
        assert ev.metrics[recall_key(limit)] == rules[f"FPR ≤ {limit * 100:g}%"].recall
        assert ev.metrics[recall_key(limit)] == pytest.approx(brute_recall_at_fpr(y, p, limit))
    for rate in ALERT_RATES:
        assert ev.metrics[precision_key(rate)] == rules[f"top {rate * 100:g}%"].precision
        assert same(ev.metrics[precision_key(rate)], brute_precision_at_top(y, p, budget(rate, y.size)))
    assert budget(0.001, y.size) == 20 and budget(0.01, y.size) == 200
    assert ev.metrics["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert ev.metrics["pr_auc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert ev.metrics["positive_rate"] == pytest.approx(y.mean())
    assert (ev.rows, ev.positives) == (20_000, int(y.sum()))


def test_a_tiny_table_by_hand():
    y = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=np.float32)
    p = np.array([0.9, 0.8, 0.7, 0.7, 0.6, 0.3, 0.2, 0.2, 0.1, 0.05], dtype=np.float32)
    c = Curve.of(y, p)
    # distinct scores, highest first, and the counts of alerting at or above each
    assert c.thresholds.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05])
    assert c.tp.tolist() == [1, 1, 2, 2, 3, 3, 3, 3] and c.fp.tolist() == [0, 1, 2, 3, 3, 5, 6, 7]
    assert (c.positives, c.negatives) == (3, 7)
    # a budget of 3 alerts: 0.7 is tied across rows 3 and 4, so only the top 2 fit
    top3 = c.at_alerts(3, "top 3")
    assert (top3.alerts, top3.tp, top3.precision) == (2, 1, 0.5)
    # FPR <= 1/7: one false alert allowed -> threshold 0.8, recall 1/3
    assert c.at_fpr(1 / 7).recall == pytest.approx(1 / 3) and c.at_fpr(1 / 7).threshold == pytest.approx(0.8)
    # no false alert allowed -> threshold 0.9
    assert c.at_fpr(0.0).tp == 1
    assert c.at_score(0.5).alerts == 5 and c.at_score(0.95).alerts == 0 and c.at_score(0.95).threshold == 0.95
    assert math.isnan(c.at_score(0.95).precision)
    # positive/negative pairs ranked right: 7 + 5 + 4 of 21, and the tied pair (0.7, 0.7) counts half
    assert c.roc_auc() == pytest.approx(16.5 / 21)
    assert c.average_precision() == pytest.approx((1 / 1 + 2 / 4 + 3 / 6) / 3)


def test_one_class_gives_nan_and_a_note():
    p = np.linspace(0, 1, 50, dtype=np.float32)
    for y in (np.zeros(50), np.ones(50)):
        got = score(y, p)
        assert all(math.isnan(v) for v in got.values()), got
        ev = evaluation(y, p)
        assert ev.table == [] and "only one class" in ev.notes[0]
        assert ev.metrics["positive_rate"] == y.mean()


def test_notes_say_when_a_number_means_less_than_its_name():
    y = np.array([1] * 5 + [0] * 295, dtype=np.float32)  # 300 rows, 295 negatives
    p = np.linspace(0, 1, 300, dtype=np.float32)[::-1].copy()
    ev = evaluation(y, p)
    assert math.isnan(ev.metrics["precision_at_top_0.1pct"])  # 0.1 % of 300 rows is 0 alerts
    assert any(n.startswith("top 0.1%: 300 rows give a budget of less than one alert") for n in ev.notes)
    assert any(n.startswith("FPR ≤ 0.1%: 295 negatives allow less than one false alert") for n in ev.notes)
    assert ev.metrics["recall_at_0.1pct_fpr"] == 1.0  # the five frauds score highest: found with no false alert
    tied = np.full(300, 0.5, dtype=np.float32)
    ev = evaluation(y, tied)
    assert math.isnan(ev.metrics["precision_at_top_1pct"]) and ev.metrics["auc"] == 0.5
    assert any("top 1%: 0 alerts, not 3: the scores at the edge of the budget are tied" in n for n in ev.notes)


def test_scores_that_are_not_finite_are_refused():
    y = np.array([0, 1, 0], dtype=np.float32)
    for bad in (np.nan, np.inf):
        with pytest.raises(FedcliError, match="not finite") as e:
            score(y, np.array([0.1, bad, 0.3], dtype=np.float32))
        assert e.value.reason == "not-finite"
        with pytest.raises(FedcliError, match="not finite"):
            evaluation(y, np.array([0.1, bad, 0.3], dtype=np.float32))
