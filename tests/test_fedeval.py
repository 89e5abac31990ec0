"""Federated evaluation: the holdout split, the signed binned histograms, and status reading them (issue 15)."""

import json

import numpy as np
import pytest
from helpers import BANKS, TEMPLATE, make_fed

from fedcli import keys
from fedcli.bank import tables
from fedcli.bank.holdout import holdout_rows
from fedcli.errors import ExitCode
from fedcli.metrics import score
from fedcli.protocol import evaluations, rounds
from fedcli.protocol.binned import Histogram
from fedcli.store import open_store

HOLDOUT = TEMPLATE.replace("[training]", "[evaluation]\nholdout = 0.2\n\n[training]", 1)
DP = HOLDOUT + '\n[privacy]\nmode = "update"\nclip = 1.0\nnoise_multiplier = 1.0\nbudget_epsilon = 1000.0\n'


def _round(fed):
    for b in BANKS:
        fed.train(b)
    fed.aggregate()


def _eval_file(fed, r: int, member: str):
    return fed.store / evaluations.evaluation_key(r, member)


# --------------------------------------------------------------------------- the maths


def test_binned_metrics_match_the_exact_ones_closely_and_add_up():
    rng = np.random.default_rng(1)
    y = (rng.random(20_000) < 0.1).astype(np.float32)
    p = 1 / (1 + np.exp(-(rng.normal(-2.5, 1.2, len(y)) + 1.8 * y)))
    exact = score(y, p)
    whole = Histogram.of(y, p, 50)
    m = whole.metrics()
    for k in ("auc", "ks", "pr_auc"):
        assert abs(m[k] - exact[k]) < 0.01, (k, m[k], exact[k])
    assert m["brier"] == pytest.approx(float(np.mean((p - y) ** 2)), abs=1e-9)
    assert m["positive_rate"] == pytest.approx(float(y.mean()))
    parts = [Histogram.of(y[i::3], p[i::3], 50) for i in range(3)]
    summed = Histogram.total(parts)
    assert summed.rows == len(y) and summed.metrics() == pytest.approx(m)
    assert Histogram.from_dict(whole.to_dict()).metrics() == pytest.approx(m, abs=1e-6)


def test_a_perfectly_calibrated_score_has_a_small_ece_and_a_constant_one_does_not():
    rng = np.random.default_rng(2)
    p = rng.random(50_000)
    y = (rng.random(len(p)) < p).astype(np.float32)
    assert Histogram.of(y, p, 50).metrics()["ece"] < 0.01
    assert Histogram.of(y, np.full(len(p), 0.9), 50).metrics()["ece"] > 0.35


# --------------------------------------------------------------------------- the split


def test_the_holdout_is_stable_under_reordering_and_keeps_duplicates_together():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(5000, 7)).astype(np.float32)
    X[100] = X[7]  # a duplicate row
    held = holdout_rows("credit-demo", X, 0.2)
    assert 0.17 < held.mean() < 0.23
    order = rng.permutation(len(X))
    assert np.array_equal(holdout_rows("credit-demo", X[order], 0.2), held[order])
    assert held[100] == held[7]
    assert not np.array_equal(holdout_rows("another-federation", X, 0.2), held)  # keyed by the federation


# --------------------------------------------------------------------------- through the CLI


def test_banks_hold_out_rows_and_publish_signed_histograms_that_status_sums(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, HOLDOUT)
    said = fed.train("bank-a").output
    assert "held out (never trained on)" in said and "published the signed holdout evaluation of round 0" in said
    for b in BANKS[1:]:
        fed.train(b)
    fed.aggregate()
    quiet = _holdout_cmd(fed, "bank-c", "--no-publish")
    assert "global of round 1: auc" in quiet.output and "not published (--no-publish)" in quiet.output
    assert not _eval_file(fed, 1, "bank-c").exists()
    table = tables.prepare(
        tables.read_table(credit_split / "bank-a.csv"),
        rounds.load_spec(open_store(str(fed.store)), None)[0].data,
        "bank-a",
    )
    total, held = len(table.X), holdout_rows("credit-demo", table.X, 0.2)
    update = json.loads((fed.store / rounds.update_keys(1, "bank-a")[1]).read_text())
    assert update["num_examples"] == total - held.sum() and 0.7 * total < update["num_examples"] < 0.9 * total
    doc = json.loads(_eval_file(fed, 0, "bank-a").read_text())
    assert doc["kind"] == "evaluation" and doc["round"] == 0 and len(doc["positives"]) == 50
    assert sum(doc["positives"]) + sum(doc["negatives"]) == total - update["num_examples"]
    assert set(doc) <= {*evaluations.EvaluationRecord.model_fields, "signature"}  # counts and sums, no rows
    res = _holdout_cmd(fed, "bank-b")
    assert "published the signed holdout evaluation of round 1" in res.output
    again = _holdout_cmd(fed, "bank-b")
    assert "already published" in again.output
    status = fed.cli("status", fed.store, "--coordinator", fed.pub("coordinator")).output
    assert "holdout: each global model" in status and "holdout AUC per bank" in status
    row0 = next(line for line in status.splitlines() if line.startswith("│     0 │   4/4"))
    row1 = next(line for line in status.splitlines() if line.startswith("│     1 │   1/4"))
    assert float(row1.split("│")[5]) > float(row0.split("│")[5])  # round 1 ranks better than the random round 0


def test_forged_oversized_and_stray_evaluation_files_are_ignored_with_a_line(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, HOLDOUT)
    _round(fed)
    good = json.loads(_eval_file(fed, 0, "bank-a").read_text())
    del good["signature"]
    forged = keys.sign_manifest(keys.load_private(fed.key("bank-c"))[0], good)  # bank-c signs as bank-a
    _eval_file(fed, 0, "bank-a").write_bytes(forged)
    impossible = json.loads(_eval_file(fed, 0, "bank-b").read_text())
    del impossible["signature"]
    impossible["score_sum"][0] = 1e6  # scores the bin cannot hold
    _eval_file(fed, 0, "bank-b").write_bytes(keys.sign_manifest(keys.load_private(fed.key("bank-b"))[0], impossible))
    _eval_file(fed, 0, "bank-d").write_bytes(b"{" + b" " * (1 << 20) + b"}")
    (_eval_file(fed, 0, "bank-a").parent / "mallory.json").write_text("{}")
    res = fed.cli("status", fed.store)
    ignored = [line for line in res.output.splitlines() if line.startswith("ignored evaluation:")]
    assert len(ignored) == 4, res.output
    assert any("bank-a.json" in line and "signature" in line for line in ignored)
    assert any("bank-b.json" in line and "bin 0" in line for line in ignored)
    assert any("bank-d.json" in line and "not read" in line for line in ignored), ignored
    assert any("mallory.json" in line for line in ignored)
    assert "│     0 │   1/4" in res.output  # only bank-c's own file counts


def test_an_evaluation_of_another_model_is_not_counted(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, HOLDOUT)
    _round(fed)
    doc = json.loads(_eval_file(fed, 0, "bank-a").read_text())
    del doc["signature"]
    doc["global_sha256"] = "ab" * 32
    _eval_file(fed, 0, "bank-a").write_bytes(keys.sign_manifest(keys.load_private(fed.key("bank-a"))[0], doc))
    found = evaluations.collect(open_store(str(fed.store)))
    assert "bank-a" not in found.by_round[0] and len(found.by_round[0]) == 3
    assert any("global_sha256" in line for line in found.ignored)


def test_someone_elses_file_at_my_place_stops_the_holdout_command(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, HOLDOUT)
    _round(fed)
    path = _eval_file(fed, 1, "bank-a")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"planted": true}')
    res = _holdout_cmd(fed, "bank-a", code=ExitCode.VERIFY)
    assert "not bank-a's valid evaluation" in res.output


def _holdout_cmd(fed, bank: str, *extra, code: int = 0):
    """`fedcli holdout` for one bank on its own table (fed.loc: the folder or the S3 store)."""
    return fed.cli(
        "holdout",
        "--store",
        fed.loc,
        "--key",
        fed.key(bank),
        "--data",
        fed.data / f"{bank}.csv",
        "--coordinator",
        fed.pub("coordinator"),
        *extra,
        code=code,
    )


def _ledger(fed, bank: str) -> list[dict]:
    found = list((tmp := fed.key(bank).parent).rglob("ledger.json"))
    assert len(found) == 1, (tmp, found)
    return json.loads(found[0].read_text())["entries"]


def test_under_dp_banks_publish_noised_counts_charged_to_their_ledger(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP)
    res = fed.train("bank-a")
    assert "published the signed holdout evaluation of round 0 (noised counts only" in res.output, res.output
    for b in BANKS[1:]:
        fed.train(b)
    fed.aggregate()
    doc = json.loads(_eval_file(fed, 0, "bank-a").read_text())
    assert doc["dp"] == {"mechanism": "gaussian", "accountant": "rdp", "noise_multiplier": 5.0, "sensitivity": 1.0}
    assert "score_sum" not in doc and "baseline" not in doc
    assert any(v != round(v) for v in doc["negatives"] + doc["positives"])  # noised: not whole numbers
    entries = _ledger(fed, "bank-a")
    record = [e for e in entries if e["mode"] == "record"]
    assert [(e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in record] == [(0, 5.0, 1.0, 1)]
    assert [e["mode"] for e in entries] == ["update", "record"]  # the update, then its evaluation
    # a second evaluation would bring record-level epsilon to 1.16
    stricter = _holdout_cmd(fed, "bank-a", "--max-epsilon", "1.0", code=ExitCode.BUDGET)
    assert "budget 1 " in stricter.output and not _eval_file(fed, 1, "bank-a").exists()
    again = _holdout_cmd(fed, "bank-a")  # the global of round 1: a second release
    assert "record-level epsilon now" in again.output
    assert len([e for e in _ledger(fed, "bank-a") if e["mode"] == "record"]) == 2
    assert "already published" in _holdout_cmd(fed, "bank-a").output  # a re-run: no third charge
    assert len([e for e in _ledger(fed, "bank-a") if e["mode"] == "record"]) == 2
    status = fed.cli("status", fed.store).output
    assert "[DP: noised counts]" in status and "every metric approximate" in status
    assert any(line.startswith("│     0 │   4/4") for line in status.splitlines())  # every bank's noised counts
    shown = fed.cli("privacy", "--key", fed.key("bank-a")).output
    assert (
        "record-level: epsilon" in shown
        and "2 release(s)" in shown
        and "(2 of them holdout evaluations" in shown.replace("\n", "")
    )
    found = evaluations.collect(open_store(str(fed.store)))
    assert found.noised and sorted(found.by_round[0]) == list(BANKS)
    true_rows = sum(len(tables.read_table(credit_split / f"{b}.csv")) for b in BANKS) * 0.2
    total = found.federation(0)
    raw = sum(float(h.raw_negatives.sum() + h.raw_positives.sum()) for h in found.by_round[0].values())
    assert abs(raw - true_rows) < 6 * 5.0 * (4 * 2 * 50) ** 0.5  # 400 counts, each with noise of std 5
    assert abs(total.rows - raw) <= 2 * 50 and total.negatives.min() >= 0  # the projection keeps the total


def test_under_dp_an_evaluation_past_the_budget_is_refused_and_nothing_is_written(tmp_path, credit_split):
    tight = DP.replace(
        "noise_multiplier = 1.0\nbudget_epsilon = 1000.0", "noise_multiplier = 5.0\nbudget_epsilon = 2.5"
    )
    tight = tight.replace("holdout = 0.2\n", "holdout = 0.2\nnoise = 2.0\n", 1)  # 2.17 per evaluation
    fed = make_fed(tmp_path, credit_split, tight)
    _round(fed)  # each bank: one update (update level, epsilon 0.79) and one evaluation (record level, 2.17)
    before = _ledger(fed, "bank-a")
    res = _holdout_cmd(fed, "bank-a", code=ExitCode.BUDGET)
    assert "holdout evaluation of round 1 not published, nothing charged" in res.output
    assert "budget 2.5" in res.output
    assert not _eval_file(fed, 1, "bank-a").exists() and _ledger(fed, "bank-a") == before
    trained = fed.train("bank-b")  # training's own release fits; its evaluation does not, and says so
    assert "holdout evaluation of round 1 not published" in trained.output
    assert not _eval_file(fed, 1, "bank-b").exists()


def test_under_dp_a_forged_lower_noise_or_exact_counts_are_ignored(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP)
    _round(fed)
    signer = {b: keys.load_private(fed.key(b))[0] for b in BANKS}
    weak = json.loads(_eval_file(fed, 0, "bank-a").read_text())
    del weak["signature"]
    weak["dp"]["noise_multiplier"] = 0.5  # claims the spec's noise was not needed
    weak["negatives"], weak["positives"] = ([max(v, 0.0) for v in weak[k]] for k in ("negatives", "positives"))
    _eval_file(fed, 0, "bank-a").write_bytes(keys.sign_manifest(signer["bank-a"], weak))
    exact = json.loads(_eval_file(fed, 0, "bank-b").read_text())
    del exact["signature"], exact["dp"]
    exact |= {k: [0.0] * 50 for k in ("score_sum", "positive_score_sum", "score_sq_sum")}
    exact["negatives"], exact["positives"] = [0] * 50, [0] * 50
    exact["negatives"][0] = 200  # bin 0 starts at score 0: zero sums are possible
    _eval_file(fed, 0, "bank-b").write_bytes(keys.sign_manifest(signer["bank-b"], exact))
    sunk = json.loads(_eval_file(fed, 0, "bank-c").read_text())
    del sunk["signature"]
    sunk["negatives"][3] = -5000.0  # would cancel the other banks' counts
    _eval_file(fed, 0, "bank-c").write_bytes(keys.sign_manifest(signer["bank-c"], sunk))
    res = fed.cli("status", fed.store)
    ignored = [line for line in res.output.splitlines() if line.startswith("ignored evaluation:")]
    assert any("bank-a.json" in line and "noise multiplier 0.5" in line for line in ignored), ignored
    assert any("bank-b.json" in line and "no noise declared" in line for line in ignored), ignored
    assert any("bank-c.json" in line and "more negative than its declared noise" in line for line in ignored)
    assert "│     0 │   1/4" in res.output  # only bank-d's own file counts


def test_noised_counts_give_a_histogram_close_to_the_exact_one():
    rng = np.random.default_rng(5)
    y = (rng.random(4000) < 0.2).astype(np.float32)
    p = 1 / (1 + np.exp(-(rng.normal(-1.5, 1.0, len(y)) + 1.5 * y)))
    exact = Histogram.of(y, p, 20)
    from fedcli.protocol.binned import noised

    parts = [noised(exact.negatives / 4, exact.positives / 4, 5.0, rng) for _ in range(4)]
    summed = Histogram.from_noised(
        np.sum([q["negatives"] for q in parts], axis=0), np.sum([q["positives"] for q in parts], axis=0)
    )
    assert summed.negatives.min() >= 0 and summed.negatives.dtype == np.int64
    m, want = summed.metrics(), exact.metrics()
    assert abs(m["auc"] - want["auc"]) < 0.03 and abs(m["brier"] - want["brier"]) < 0.02


def test_without_a_holdout_nothing_changes_and_status_says_so(fed):
    fed.train("bank-a")
    assert not (fed.store / "rounds/000000/evaluations").exists()
    assert "[evaluation] holdout is 0" in fed.cli("status", fed.store).output
    res = _holdout_cmd(fed, "bank-a", code=ExitCode.ERROR)
    assert "holds out no rows" in res.output


@pytest.mark.slow
def test_holdout_evaluations_on_s3(moto_s3, tmp_path, credit_split, monkeypatch):
    from helpers import use_s3

    fed = make_fed(tmp_path, credit_split, HOLDOUT, url=use_s3(moto_s3, monkeypatch))
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    _holdout_cmd(fed, "bank-a")
    found = evaluations.collect(open_store(fed.loc))
    assert sorted(found.by_round[0]) == ["bank-a", "bank-b", "bank-c"] and list(found.by_round[1]) == ["bank-a"]
    assert "│     0 │   3/4" in fed.cli("status", fed.loc).output


def test_an_evaluation_claiming_more_rows_than_a_member_may_have_is_ignored(tmp_path, credit_split):
    spec = HOLDOUT.replace("deadline_minutes = 0 ", "max_rows_per_member = 2000\ndeadline_minutes = 0 ", 1)
    fed = make_fed(tmp_path, credit_split, spec)
    _round(fed)
    doc = json.loads(_eval_file(fed, 0, "bank-b").read_text())
    del doc["signature"]
    doc["negatives"][0] += 5000  # with scores the bin can hold: only the row bound catches it
    _eval_file(fed, 0, "bank-b").write_bytes(keys.sign_manifest(keys.load_private(fed.key("bank-b"))[0], doc))
    found = evaluations.collect(open_store(str(fed.store)))
    assert "bank-b" not in found.by_round[0] and any("max_rows_per_member" in line for line in found.ignored)


BASELINE = HOLDOUT.replace("holdout = 0.2\n", "holdout = 0.2\nbaseline = true\n", 1)


def test_each_bank_alone_is_scored_on_the_same_holdout_and_shown_beside_the_federation(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, BASELINE)
    for _ in (1, 2):
        _round(fed)
    found = evaluations.collect(open_store(str(fed.store)))
    assert sorted(found.baselines[1]) == list(BANKS)
    for b in BANKS:  # round 0: both are the shared initial weights
        assert found.baselines[0][b].to_dict() == found.by_round[0][b].to_dict()
        assert found.baselines[1][b].to_dict() != found.by_round[1][b].to_dict()
        assert found.baselines[1][b].rows == found.by_round[1][b].rows
    kept = sorted(p.name for p in (tmp_path / "bank-a").rglob("*.baseline-r*.safetensors"))
    assert len(kept) == 1 and kept[0].endswith(".baseline-r000001.safetensors")  # only the latest round is kept
    status = fed.cli("status", fed.store).output
    auc = found.by_round[1]["bank-b"].metrics()["auc"]
    alone = found.baselines[1]["bank-b"].metrics()["auc"]
    assert f"{auc:.3f} ({alone:.3f})" in status and "trained on its rows alone" in status
    out = tmp_path / "r.html"
    fed.cli("report", fed.store, "--out", out)
    page = out.read_text()
    assert "AUC ≈ alone" in page and f"<td>{alone:.4f}</td>" in page


def test_a_baseline_over_other_rows_is_refused_by_the_contract(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, BASELINE)
    _round(fed)
    doc = json.loads(_eval_file(fed, 0, "bank-a").read_text())
    del doc["signature"]
    doc["baseline"]["negatives"][0] += 1
    _eval_file(fed, 0, "bank-a").write_bytes(keys.sign_manifest(keys.load_private(fed.key("bank-a"))[0], doc))
    found = evaluations.collect(open_store(str(fed.store)))
    assert "bank-a" not in found.by_round[0] and any("other rows" in line for line in found.ignored)
    alone = found.alone(0)  # over the same banks as the federation's sum: the three valid ones
    assert alone is not None and alone.rows == found.federation(0).rows


def test_under_dp_a_lost_ledger_is_caught_and_recovered_with_its_evaluations(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP)
    _round(fed)
    ledger = next(fed.key("bank-a").parent.rglob("ledger.json"))
    kept = json.loads(ledger.read_text())["entries"]
    ledger.unlink()
    res = _holdout_cmd(fed, "bank-a", code=ExitCode.BUDGET)
    assert "1, 0 (holdout evaluation)" in res.output and not _eval_file(fed, 1, "bank-a").exists()
    fed.cli("recover-ledger", "--store", fed.store, "--key", fed.key("bank-a"), "--coordinator", fed.pub("coordinator"))
    back = json.loads(ledger.read_text())["entries"]
    assert [(e["round"], e["mode"], e.get("release")) for e in back] == [
        (1, "update", None),
        (0, "record", "evaluation"),
    ]
    assert [e["noise_multiplier"] for e in back] == [e["noise_multiplier"] for e in kept]
    assert "published the signed holdout evaluation of round 1" in _holdout_cmd(fed, "bank-a").output


@pytest.mark.slow
def test_under_record_level_dp_evaluations_compose_with_dp_sgd_against_one_budget(tmp_path, credit_split):
    record = (
        HOLDOUT + '\n[privacy]\nmode = "record"\nclip = 1.0\ntarget_epsilon = 3.0\nrounds = 5\nbudget_epsilon = 6.0\n'
    )
    fed = make_fed(tmp_path, credit_split, record)
    res = fed.train("bank-a")
    assert "published the signed holdout evaluation of round 0 (noised counts only" in res.output, res.output
    entries = _ledger(fed, "bank-a")
    assert [(e["round"], e["mode"], e.get("release")) for e in entries] == [
        (1, "record", None),
        (0, "record", "evaluation"),
    ]
    trained, evaluated = entries
    assert trained["sample_rate"] < 1 and evaluated["epsilon_after"] > trained["epsilon_after"] + 0.1
    assert "record-level: epsilon" in fed.cli("privacy", "--key", fed.key("bank-a")).output


@pytest.mark.slow
def test_a_target_epsilon_covers_the_evaluations_so_the_planned_rounds_fit_and_the_end_is_signed(
    tmp_path, credit_split
):
    """target_epsilon over `rounds` rounds: DP-SGD's noise is calibrated with the DP holdout evaluations beside it,
    so all planned rounds fit the budget; then the coordinator prices the evaluations too and signs the end
    (before: the third round's training was refused at every bank and aggregate waited forever)."""
    spec = HOLDOUT + '\n[privacy]\nmode = "record"\nclip = 1.0\ntarget_epsilon = 3.0\nrounds = 2\n'
    fed = make_fed(tmp_path, credit_split, spec, banks=BANKS[:3])
    for r in (1, 2):
        for b in BANKS[:3]:
            assert f"submitted update for round {r}" in fed.train(b).output
        res = fed.aggregate()
    assert "complete" in res.output and "privacy budget is used up" in res.output
    assert "federation complete" in fed.train("bank-a").output or "is complete" in fed.train("bank-a").output
    spent = _ledger(fed, "bank-a")[-1]["epsilon_after"]
    assert 2.5 < spent <= 3.0  # the whole target, training and evaluations together, and not more
    from fedcli.report import collect
    from fedcli.store import open_store

    last = max((e for e in collect(open_store(str(fed.store))).entries if e.member == "bank-a"), key=lambda e: e.round)
    assert last.epsilon == pytest.approx(spent, abs=0.01)  # the report prices the evaluations as the ledger does
