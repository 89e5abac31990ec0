"""Calibration, credit views and prior correction (fedcli.metrics), each against an independent
reference (scikit-learn, scipy or a brute-force count), and as `fedcli evaluate` / `predict` show them."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from helpers import BANKS, TEMPLATE, make_fed
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import ks_2samp
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from fedcli.errors import FedcliError
from fedcli.metrics import (
    PriorCorrection,
    brier_score,
    calibration,
    calibration_sums,
    evaluation,
    expected_calibration_error,
    gini,
    ks_threshold,
    logit,
    prior_shift,
    reliability,
    score_bands,
    shift_scores,
)

# hypothesis: small tables with heavy ties (scores on a coarse grid, 0 and 1 and bin edges included)
tables = st.integers(2, 80).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < n),
        st.lists(st.integers(0, 20), min_size=n, max_size=n),
    )
)


def arrays(drawn) -> tuple[np.ndarray, np.ndarray]:
    y, grid = drawn
    return np.array(y, dtype=np.float32), np.array(grid, dtype=np.float64) / 20


def realistic(n=5000, seed=1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.2, 1.3, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(z + rng.normal(0, 0.8, n))))).astype(np.float32)
    return y, (1 / (1 + np.exp(-z))).astype(np.float32)


# --------------------------------------------------------------------------- against references


@given(tables)
def test_brier_reliability_and_ece_match_scikit_learn(drawn):
    y, p = arrays(drawn)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = [b for b in reliability(y, p) if b.rows]
    assert [b.observed_rate for b in filled] == pytest.approx(prob_true, abs=1e-12)
    assert [b.mean_score for b in filled] == pytest.approx(prob_pred, abs=1e-12)
    # ECE from the reference's bins: the rows per bin by counting, the gaps from scikit-learn
    edges = np.linspace(0, 1, 11)
    counts = np.array(
        [np.sum((p > lo) & (p <= hi)) + (np.sum(p == 0) if lo == 0 else 0) for lo, hi in itertools.pairwise(edges)]
    )
    counts = counts[counts > 0]
    assert [b.rows for b in filled] == counts.tolist()
    assert expected_calibration_error(y, p) == pytest.approx(np.sum(counts * np.abs(prob_true - prob_pred)) / len(y))


@given(tables)
def test_ks_and_its_score_gini_match_scipy_and_scikit_learn(drawn):
    y, p = arrays(drawn)
    ks, at = ks_threshold(y, p)
    assert ks == pytest.approx(ks_2samp(p[y == 0], p[y == 1], alternative="greater").statistic, abs=1e-12)
    # the score where it is reached: alerting p >= at gives exactly that gap
    flagged = p >= at
    assert np.mean(flagged[y == 1]) - np.mean(flagged[y == 0]) == pytest.approx(ks, abs=1e-12)
    assert gini(y, p) == pytest.approx(2 * roc_auc_score(y, p) - 1, abs=1e-12)


@given(tables)
def test_score_bands_cover_every_row_once_and_never_split_a_tie(drawn):
    y, p = arrays(drawn)
    bands = score_bands(y, p)
    assert sum(b.rows for b in bands) == len(y) and sum(b.positives for b in bands) == int(y.sum())
    assert [b.band for b in bands] == list(range(1, len(bands) + 1))
    for b in bands:  # brute force: the rows whose score is in [low, high]
        inside = (p >= b.low) & (p <= b.high)
        assert (inside.sum(), y[inside].sum()) == (b.rows, b.positives)
    for upper, lower in itertools.pairwise(bands):
        assert lower.high < upper.low  # a tie is never split across bands
    last = bands[-1]
    assert (last.cum_rows, last.cum_positives, last.cum_share_of_bads) == (len(y), int(y.sum()), 1.0)


def test_score_bands_are_deciles_when_scores_are_distinct():
    y, p = realistic(1003)
    order = np.argsort(-p.astype(np.float64), kind="stable")
    bands = score_bands(y, p)
    assert len(bands) == 10
    start = 0
    for k, b in enumerate(bands, 1):
        end = math.ceil(k * len(y) / 10)
        assert b.rows == end - start and b.positives == int(y[order[start:end]].sum())
        assert b.bad_rate == pytest.approx(y[order[start:end]].mean())
        start = end
    assert bands[0].bad_rate > bands[-1].bad_rate  # a model with skill: the top band is the riskiest


def test_evaluation_carries_calibration_and_credit_and_one_class_has_none():
    y, p = realistic()
    ev = evaluation(y, p)
    assert ev.calibration is not None and ev.credit is not None
    assert ev.calibration.brier == pytest.approx(brier_score_loss(y, p))
    assert ev.credit.ks == pytest.approx(ev.metrics["ks"], abs=1e-12)
    assert ev.calibration.mean_score == pytest.approx(p.mean()) and ev.calibration.positive_rate == y.mean()
    one = evaluation(np.zeros(5, np.float32), np.full(5, 0.3, np.float32))
    assert one.credit is None and one.calibration is not None and one.calibration.brier == pytest.approx(0.09)
    assert math.isnan(gini(np.zeros(3), np.ones(3) / 2)) and math.isnan(ks_threshold(np.ones(3), np.ones(3) / 2)[0])


def test_calibration_sums_of_banks_add_up_to_the_pooled_calibration():
    """What a federated holdout round can aggregate: per-bank sums, merged, give the pooled numbers."""
    y, p = realistic(3000, seed=4)
    parts = [calibration_sums(y[a:b], p[a:b]) for a, b in ((0, 700), (700, 2100), (2100, 3000))]
    merged = parts[0].merge(parts[1]).merge(parts[2]).calibration()
    pooled = calibration(y, p)
    assert merged.brier == pytest.approx(pooled.brier, rel=1e-12) and merged.ece == pytest.approx(pooled.ece, rel=1e-12)
    assert [b.rows for b in merged.bins] == [b.rows for b in pooled.bins]
    assert merged.positive_rate == pytest.approx(y.mean()) and merged.mean_score == pytest.approx(p.mean(), rel=1e-6)
    with pytest.raises(ValueError, match="10 bins against 5"):
        parts[0].merge(calibration_sums(y, p, bins=5))
    assert math.isnan(calibration(np.zeros(0), np.zeros(0)).brier)


def test_metric_functions_refuse_bad_input():
    with pytest.raises(FedcliError, match="not finite"):
        calibration(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="2 labels for 3 scores"):
        brier_score(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------- prior correction


def test_prior_shift_moves_the_odds_by_exactly_the_ratio():
    p = np.array([0.01, 0.2, 0.5, 0.9], dtype=np.float64)
    w = 4.0
    undone = shift_scores(p, prior_shift(w))
    assert (undone / (1 - undone)) == pytest.approx((p / (1 - p)) / w, rel=1e-12)
    moved = shift_scores(p, prior_shift(1.0, base_rate=0.01, train_rate=0.2))
    ratio = (0.01 / 0.99) / (0.2 / 0.8)
    assert (moved / (1 - moved)) == pytest.approx((p / (1 - p)) * ratio, rel=1e-12)
    assert shift_scores(p, 0.0) is p and logit(np.array([0.5]))[0] == 0
    # a model predicting the train rate predicts the base rate after the correction
    assert shift_scores(np.array([0.2]), prior_shift(1.0, 0.01, 0.2))[0] == pytest.approx(0.01, rel=1e-12)
    assert PriorCorrection().shift(3.0) == 0.0 and PriorCorrection(True).shift(3.0) == pytest.approx(-math.log(3))


@pytest.mark.parametrize(
    ("base", "train", "match"),
    [
        (0.1, None, "needs both"),
        (None, 0.1, "needs both"),
        (0.0, 0.1, "strictly between"),
        (0.5, 1.5, "strictly between"),
    ],
)
def test_prior_shift_refuses_a_half_or_impossible_request(base, train, match):
    with pytest.raises(FedcliError, match=match):
        prior_shift(1.0, base, train)


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def credit_fed(tmp_path_factory, credit_split):
    """One round of the demo federation with pos_weight 3 (so --undo-pos-weight has work to do)."""
    spec = TEMPLATE.replace("lr = 0.02", "lr = 0.02\npos_weight = 3.0")
    fed = make_fed(tmp_path_factory.mktemp("riskfed"), credit_split, spec)
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    return fed


def _scores(fed, tmp_path, *extra) -> tuple[np.ndarray, np.ndarray]:
    fed.predict(fed.data / "test.csv", tmp_path / "scores.csv", *extra)
    table = pd.read_csv(tmp_path / "scores.csv")
    return (table["Status"] == "bad").to_numpy(np.float32), table["score"].to_numpy(np.float64)


@pytest.mark.slow
def test_evaluate_out_json_carries_every_number_of_predicts_scores(credit_fed, tmp_path):
    fed = credit_fed
    res = fed.evaluate(fed.data / "test.csv", "--out", tmp_path / "ev.json")
    doc = json.loads((tmp_path / "ev.json").read_text())
    y, p = _scores(fed, tmp_path)
    c, k = doc["calibration"], doc["credit"]
    assert doc["round"] == 1 and doc["rows"] == len(y) and doc["prior_correction"] is None
    manifest = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert doc["tensors_sha256"] == manifest["tensors_sha256"] and doc["federation_id"] == "credit-demo"
    assert c["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-7)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10)
    shown = [b for b in c["reliability"] if b["rows"]]
    assert [b["observed_rate"] for b in shown] == pytest.approx(prob_true, abs=1e-12)
    assert [b["mean_score"] for b in shown] == pytest.approx(prob_pred, abs=1e-6)
    assert k["gini"] == pytest.approx(2 * roc_auc_score(y, p) - 1, abs=1e-12)
    assert k["ks"] == pytest.approx(ks_2samp(p[y == 0], p[y == 1], alternative="greater").statistic, abs=1e-12)
    assert sum(b["rows"] for b in k["bands"]) == len(y) and sum(b["bads"] for b in k["bands"]) == int(y.sum())
    # the console shows the same numbers
    assert f"{c['brier']:.4f}" in res.output and f"{k['gini']:.4f}" in res.output and "score bands" in res.output
    assert "reliability" in res.output


@pytest.mark.slow
def test_undo_pos_weight_and_base_rate_shift_the_scores_and_are_said(credit_fed, tmp_path):
    fed = credit_fed
    y, raw = _scores(fed, tmp_path)
    _, undone = _scores(fed, tmp_path, "--undo-pos-weight")
    assert logit(undone) == pytest.approx(logit(raw) - math.log(3), abs=1e-5)
    _, based = _scores(fed, tmp_path, "--base-rate", "0.05", "--train-rate", "0.28")
    expected = logit(raw) - math.log(3) + math.log((0.05 / 0.95) / (0.28 / 0.72))
    assert logit(based) == pytest.approx(expected, abs=1e-5)
    # weighting the positives 3x lifted the scores above the positive rate; undoing it brings them back nearer
    res = fed.evaluate(fed.data / "test.csv", "--undo-pos-weight", "--out", tmp_path / "ev.json")
    doc = json.loads((tmp_path / "ev.json").read_text())
    assert "pos_weight 3 undone" in doc["prior_correction"] and "prior-corrected" in res.output
    rate = y.mean()
    assert abs(undone.mean() - rate) < abs(raw.mean() - rate)
    assert doc["calibration"]["brier"] == pytest.approx(brier_score_loss(y, undone), abs=1e-6)
    # ranking metrics do not move: a monotone shift
    assert doc["metrics"]["auc"] == pytest.approx(roc_auc_score(y, raw), abs=1e-6)


@pytest.mark.slow
def test_a_half_prior_request_is_one_line_and_writes_nothing(credit_fed, tmp_path):
    fed = credit_fed
    res = fed.predict(fed.data / "test.csv", tmp_path / "s.csv", "--base-rate", "0.05", code=1)
    assert "needs both --base-rate" in res.output and not (tmp_path / "s.csv").exists()
    res = fed.evaluate(fed.data / "test.csv", "--base-rate", "2", "--train-rate", "0.3", code=1)
    assert "strictly between 0 and 1" in res.output
    res = fed.evaluate(fed.data / "test.csv", "--out", tmp_path / "missing" / "ev.json", code=1)
    assert "cannot write" in res.output
