"""Rare-event metrics: each against scikit-learn or a brute-force reference (ties included), and
where they show: evaluate, the update manifests, status and report."""

import importlib.util
import json
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import BANKS, ROOT, forge, make_fed
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from fedcli.errors import FedcliError
from fedcli.metrics import (
    ALERT_RATES,
    FPR_LIMITS,
    MANIFEST_METRICS,
    Ranking,
    budget,
    evaluation,
    precision_key,
    recall_key,
    score,
)
from fedcli.protocol import rounds
from fedcli.report import METRICS

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
    point = Ranking.of(y, p).at_fpr(limit)
    got = point.recall
    assert got == pytest.approx(brute_recall_at_fpr(y, p, limit), abs=1e-12)
    # at the highest threshold reaching that recall: a lower one would only add false alerts
    negatives = int(np.sum(y == 0))
    best = [t for t, tp, fp in brute_points(y, p) if fp / negatives <= limit and tp == point.tp]
    assert point.threshold == max(best)
    # the same as reading scikit-learn's full ROC curve (no interpolation between thresholds)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    assert got == pytest.approx(np.max(tpr[fpr <= limit]), abs=1e-12)


@given(tables, st.integers(0, 70))
def test_precision_at_top_k_never_exceeds_the_budget_and_never_splits_a_tie(drawn, k):
    y, p = arrays(drawn)
    point = Ranking.of(y, p).at_alerts(k, f"top {k}")
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
    c = Ranking.of(y, p)
    assert (c.positives, c.negatives) == (3, 7)
    # alerting at or above each score: (alerts, true alerts)
    alerts, tp = c.counts(np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.05], dtype=np.float32))
    assert alerts.tolist() == [1, 2, 4, 5, 6, 10] and tp.tolist() == [1, 1, 2, 2, 3, 3]
    # a budget of 3 alerts: 0.7 is tied across rows 3 and 4, so only the top 2 fit
    top3 = c.at_alerts(3, "top 3")
    assert (top3.alerts, top3.tp, top3.precision) == (2, 1, 0.5) and top3.threshold == np.float32(0.8)
    assert c.at_alerts(4, "top 4").alerts == 4 and c.at_alerts(100, "all").alerts == 10
    assert c.at_alerts(0, "none").threshold == math.inf
    # FPR <= 1/7 allows one false alert: the best recall is 1/3, reached already at 0.9 (no false alert)
    best = c.at_fpr(1 / 7)
    assert best.recall == pytest.approx(1 / 3) and best.threshold == np.float32(0.9) and best.fp == 0
    assert c.at_fpr(2 / 7).recall == pytest.approx(2 / 3) and c.at_fpr(2 / 7).threshold == np.float32(0.7)
    assert c.at_fpr(1.0).recall == 1.0 and c.at_fpr(1.0).threshold == np.float32(0.3)  # not 0.05: no gain below
    assert c.at_score(0.5).alerts == 5 and c.at_score(0.95).alerts == 0 and c.at_score(0.95).threshold == 0.95
    assert math.isnan(c.at_score(0.95).precision)
    # positive/negative pairs ranked right: 7 + 5 + 4 of 21, and the tied pair (0.7, 0.7) counts half
    assert c.roc_auc() == pytest.approx(16.5 / 21)
    # precision where each positive is found: 1/1, 2/4 (the tie at 0.7 comes in whole), 3/6
    assert c.average_precision() == pytest.approx((1 / 1 + 2 / 4 + 3 / 6) / 3)
    assert c.ks() == pytest.approx(max(1 / 3 - 0, 2 / 3 - 2 / 7, 1 - 3 / 7))


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


# --------------------------------------------------------------------------- through the CLI


def _load_simulator():
    path = ROOT / "examples" / "fraud" / "simulate.py"
    spec = importlib.util.spec_from_file_location("fraud_simulate_metrics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fraud_fed(tmp_path_factory):
    """The fraud example's spec on a small simulated split: round 1 published, round 2 open (two updates)."""
    root = tmp_path_factory.mktemp("fraudfed")
    _load_simulator().main(
        ["--out", str(root / "split"), "--customers", "400", "--terminals", "800", "--days", "60", "--test-days", "15"]
    )
    fed = make_fed(
        root / "fed", root / "split", spec_text=(ROOT / "examples" / "fraud" / "federation.toml").read_text()
    )
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    for b in BANKS[:2]:
        fed.train(b)
    return fed


def _manifest(fed, r: int, member: str) -> dict:
    return json.loads((fed.store / rounds.update_keys(r, member)[1]).read_text())


def _cells(output: str) -> list[list[str]]:
    """The cells of every row of the rich tables in output."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]


def _headline(output: str) -> dict[str, str]:
    return {row[0]: row[1] for row in _cells(output) if len(row) == 3 and row[0]}


@pytest.mark.slow
def test_update_manifests_carry_pr_auc_and_recall_before_and_after(fraud_fed):
    fed = fraud_fed
    keys_ = {"loss"} | {f"{k}_{w}" for k in MANIFEST_METRICS for w in ("before", "after")}
    for r, members in ((1, BANKS), (2, BANKS[:2])):
        for b in members:
            metrics = _manifest(fed, r, b)["metrics"]
            assert set(metrics) == keys_, metrics
            assert all(0 <= metrics[k] <= 1 for k in keys_ - {"loss"})
    # "before" is the global model the bank started from, on its own rows: what evaluate says of it there
    where = ("--store", fed.store, "--coordinator", fed.pub("coordinator"))
    for r in (1, 2):
        shown = _headline(fed.cli("evaluate", *where, "--round", r - 1, "--data", fed.data / "bank-a.csv").output)
        metrics = _manifest(fed, r, "bank-a")["metrics"]
        assert shown["auc"] == f"{metrics['auc_before']:.4f}"
        assert shown["pr_auc"] == f"{metrics['pr_auc_before']:.4f}"
        assert shown["recall_at_1pct_fpr"] == f"{metrics['recall_at_1pct_fpr_before']:.4f}"
    # the train command shows them as a before row and an after row
    res = fed.cli("train", *where[:2], "--key", fed.key("bank-c"), "--data", fed.data / "bank-c.csv", *where[2:])
    rows = {row[0]: row[1:] for row in _cells(res.output)}
    metrics = _manifest(fed, 2, "bank-c")["metrics"]
    stems = list(MANIFEST_METRICS)
    assert rows["global model it started from"] == [f"{metrics[f'{k}_before']:.4f}" for k in stems]
    assert rows["trained here"] == [f"{metrics[f'{k}_after']:.4f}" for k in stems]


@pytest.mark.slow
def test_evaluate_shows_the_metrics_of_the_scores_predict_writes(fraud_fed, tmp_path):
    fed = fraud_fed
    where = ("--store", fed.store, "--coordinator", fed.pub("coordinator"))
    res = fed.cli("evaluate", *where, "--data", fed.data / "test.csv")
    fed.cli("predict", *where, "--data", fed.data / "test.csv", "--out", tmp_path / "scores.csv")
    scored = pd.read_csv(tmp_path / "scores.csv")
    y, p = (scored["is_fraud"] == 1).to_numpy(np.float32), scored["score"].to_numpy()
    shown = _headline(res.output)
    assert shown["auc"] == f"{roc_auc_score(y, p):.4f}" and shown["pr_auc"] == f"{average_precision_score(y, p):.4f}"
    for limit in FPR_LIMITS:
        assert shown[recall_key(limit)] == f"{brute_recall_at_fpr(y, p, limit):.4f}"
    for rate in ALERT_RATES:
        assert shown[precision_key(rate)] == f"{brute_precision_at_top(y, p, budget(rate, len(y))):.4f}"
    assert shown["positive_rate"] == f"{y.mean():.4f}"
    # the threshold table: each row's counts are what alerting at its threshold gives on predict's scores
    table = [row for row in _cells(res.output) if len(row) == 8]
    assert [row[0] for row in table][:1] == ["top 0.1%"] and len(table) == 7
    for rule, threshold, alerts, tp, fp, _, _, fpr in table:
        flagged = p >= float(threshold)
        assert int(alerts.replace(",", "")) == flagged.sum(), rule
        assert int(tp.replace(",", "")) == (flagged & (y == 1)).sum(), rule
        assert int(fp.replace(",", "")) == (flagged & (y == 0)).sum(), rule
        if rule.startswith("top "):
            assert flagged.sum() <= budget(float(rule[4:-1]) / 100, len(y))
        if rule.startswith("FPR ≤ "):
            assert float(fpr) <= float(rule[6:-1]) / 100 + 5e-5
    assert "operating points: an alert is a row scored at or above the threshold" in res.output


@pytest.mark.slow
def test_status_and_report_show_pr_auc_per_round_and_bank(fraud_fed, tmp_path):
    fed = fraud_fed
    res = fed.cli("status", fed.store, "--coordinator", fed.pub("coordinator"))
    published = json.loads((fed.store / "rounds/000001/global.json").read_text())
    mean = np.mean([c["metrics"]["pr_auc_before"] for c in published["contributors"]])
    row = next(row for row in _cells(res.output) if row[0] == "1")
    assert row[5] == f"{mean:.4f}" and "pr_auc" in res.output

    out = tmp_path / "rep.html"
    fed.cli("report", fed.store, "--out", out, "--coordinator", fed.pub("coordinator"))
    page = out.read_text()
    assert "<th>pr_auc before</th><th>pr_auc after</th>" in page and "recall at 1% FPR after" in page
    for r, members in ((1, BANKS), (2, BANKS[:2])):
        for b in members:
            m = _manifest(fed, r, b)["metrics"]
            cells = "".join(f"<td>{m[k]:.4f}</td>" for k in METRICS)
            assert re.search(rf"<td>{r}</td><td>{b}</td><td><span[^>]*>\w+</span></td><td>\d+</td>{cells}", page), b
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size[1] >= 1200 and len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200


def test_a_rate_outside_0_1_is_refused_and_an_old_manifest_still_counts(fed):
    forge(fed, "bank-a", metrics={"loss": 0.4, "auc_before": 0.5, "auc_after": 0.7})  # what fedcli wrote before
    forge(fed, "bank-b", metrics={"loss": 0.4, "pr_auc_after": 1.5})
    forge(fed, "bank-c", metrics={"recall_at_1pct_fpr_before": -0.1})
    forge(fed, "bank-d", metrics={"loss": 1e300})
    res = fed.cli("aggregate", "--key", fed.key("coordinator"), "--store", fed.store, code=None)
    assert "pr_auc_after is 1.5: a rate lies between 0 and 1" in res.output
    assert "recall_at_1pct_fpr_before is -0.1: a rate lies between 0 and 1" in res.output
    assert "loss is 1e+300: beyond ±1e+12" in res.output
    rejected = json.loads((fed.store / "rounds/000001/rejections.json").read_text())["entries"]
    assert sorted(rejected) == ["bank-b", "bank-c", "bank-d"]
    assert all(e["reason"] == "malformed" for e in rejected.values())


def test_an_empty_panel_says_why():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcli.report import Entry, _why_empty

    old = [Entry(1, "bank-a", "accepted", 10, {"loss": 0.3, "auc_before": 0.5, "auc_after": 0.6})]
    dp = [Entry(1, "bank-a", "accepted", None, {})]
    new = [Entry(1, "bank-a", "accepted", 10, {"pr_auc_after": 0.2})]
    for entries, said in ((old, "older fedcli"), (dp, "DP updates withhold them"), (new, None)):
        fig, ax = plt.subplots()
        _why_empty(ax, entries, "pr_auc_after")
        texts = [t.get_text() for t in ax.texts]
        plt.close(fig)
        assert (said is None and not texts) or (said is not None and said in texts[0]), texts
