"""A federation that lives for months (issue 13): per-federation state, the ledger, freshness, the
coordinator's own state, locks, the final marker and moving the store. Everything through the CLI."""

import json
import shutil
import time

import pytest
from helpers import BANKS, TEMPLATE, Fed, bank_dir, ledger_file, make_fed, one_line, snapshot, state_file, use_s3

from fedcli import keys
from fedcli.errors import ExitCode


def second_federation(fed, name: str = "second", banks=BANKS[:3], code: int = 0):
    """Another federation on another store, with the same keys (the CliRunner result when code is not 0)."""
    store = fed.root / f"store-{name}"
    res = fed.cli(
        "init",
        store,
        "--spec",
        fed.root / "federation.toml",
        "--key",
        fed.key("coordinator"),
        "--id",
        name,
        *[x for b in banks for x in ("--member", fed.pub(b))],
        code=code,
    )
    return store if code == 0 else res


def train_on(fed, store, bank: str, *extra, code: int | None = 0):
    return fed.cli(
        "train",
        "--store",
        store,
        "--key",
        fed.key(bank),
        "--data",
        fed.data / f"{bank}.csv",
        "--coordinator",
        fed.pub("coordinator"),
        *extra,
        code=code,
    )


def test_one_key_two_federations_keep_their_own_state(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    fed.train("bank-a")  # round 2 of credit-demo
    other = second_federation(fed)
    train_on(fed, other, "bank-a")  # round 1 of the second: no "belongs to federation", no rollback
    assert json.loads(state_file(fed, "bank-a").read_text())["last_round"] == 1
    assert json.loads(state_file(fed, "bank-a", "second").read_text()) == {
        "federation_id": "second",
        "last_round": 0,
        "last_sha256": json.loads((other / "rounds/000000/global.json").read_text())["tensors_sha256"],
    }


def test_old_layout_state_is_still_read(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    old = fed.key("bank-a").with_suffix(".state.json")
    shutil.move(state_file(fed, "bank-a"), old)  # what fedcli before per-federation folders kept
    data = json.loads(old.read_text())
    old.write_text(json.dumps(data | {"last_round": 5}))  # it saw round 5: the store (round 1) is rolled back
    line = one_line(fed.train("bank-a", code=4))
    assert "rollback" in line and "already saw round 5" in line and "--state" in line and "store copy" in line


def test_a_state_file_of_another_federation_names_the_file_and_the_flag(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    fed.train("bank-a")
    other = second_federation(fed)
    wrong = state_file(fed, "bank-a")
    line = one_line(train_on(fed, other, "bank-a", "--state", wrong, code=4))
    assert str(wrong) in line and "given with --state" in line and "belongs to federation credit-demo" in line
    assert not bank_dir(fed, "bank-a", "second").exists()


def test_fedcli_home_holds_the_state_per_key_and_federation(tmp_path, credit_split, monkeypatch):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    monkeypatch.setenv("FEDCLI_HOME", str(tmp_path / "home"))
    fed.train("bank-a")
    found = list((tmp_path / "home").glob("*/credit-demo/state.json"))
    assert len(found) == 1 and len(found[0].parts[-3]) == 16  # the key's fingerprint, then the federation
    assert not bank_dir(fed, "bank-a").exists()


DP = TEMPLATE + '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = 50\n'


def test_the_ledger_cannot_be_reset_by_moving_files(tmp_path, credit_split, monkeypatch):
    fed = make_fed(tmp_path, credit_split, DP, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    ledger = ledger_file(fed, "bank-a")
    saved = json.loads(ledger.read_text())
    assert saved["federation_id"] == "credit-demo" and len(saved["key_fingerprint"]) == 16
    ledger.unlink()  # deleted
    before = snapshot(fed)
    line = one_line(fed.train("bank-a", code=ExitCode.BUDGET))
    assert "rounds 1)" in line and str(ledger) in line and "lacks" in line and "recover-ledger" in line
    monkeypatch.setenv("FEDCLI_HOME", str(tmp_path / "home"))  # the key "copied" to a host with another home
    one_line(fed.train("bank-a", code=ExitCode.BUDGET))
    monkeypatch.delenv("FEDCLI_HOME")
    fresh = tmp_path / "fresh.json"  # pointed elsewhere
    one_line(train_on(fed, fed.store, "bank-a", "--ledger", fresh, code=ExitCode.BUDGET))
    shutil.copy(ledger_file(fed, "bank-b"), fresh)  # another bank's ledger (same federation, one release too)
    line = one_line(train_on(fed, fed.store, "bank-a", "--ledger", fresh, code=1))
    assert "belongs to key" in line and str(fresh) in line
    assert snapshot(fed) == before and not ledger.exists()
    res = fed.cli(
        "recover-ledger", "--store", fed.loc, "--key", fed.key("bank-a"), "--coordinator", fed.pub("coordinator")
    )
    assert "recorded round 1: update-level" in res.output and "1 release(s)" in res.output
    fed.train("bank-a")
    assert [e["round"] for e in json.loads(ledger.read_text())["entries"]] == [1, 2]


def test_a_ledger_of_another_federation_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP, banks=BANKS[:3])
    fed.train("bank-a")
    other = second_federation(fed)
    line = one_line(train_on(fed, other, "bank-a", "--ledger", ledger_file(fed, "bank-a"), code=1))
    assert "belongs to federation credit-demo, not second" in line


def test_max_epsilon_without_dp_in_the_spec_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    before = snapshot(fed)
    line = one_line(train_on(fed, fed.store, "bank-a", "--max-epsilon", "0.5", code=1))
    assert "--max-epsilon 0.5" in line and "no differential privacy" in line and "nothing was sent" in line
    assert snapshot(fed) == before and not bank_dir(fed, "bank-a").exists()


def test_predict_and_evaluate_refuse_a_store_whose_newest_global_was_deleted(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for _ in (1, 2):
        for b in BANKS[:3]:
            fed.train(b)
        fed.aggregate()
    holdout = fed.data / "bank-a.csv"
    res = fed.predict(holdout, tmp_path / "s.csv", "--key", fed.key("bank-a"))
    assert "round 2" in res.output and "not checked against this bank's state" not in res.output
    assert json.loads(state_file(fed, "bank-a").read_text())["last_round"] == 2
    (fed.store / "rounds/000002/global.json").unlink()  # the attacker deletes the newest global
    out = tmp_path / "old.csv"
    line = one_line(fed.predict(holdout, out, "--key", fed.key("bank-a"), code=4))
    assert "rollback" in line and "already saw round 2" in line and not out.exists()
    line = one_line(fed.evaluate(holdout, "--key", fed.key("bank-a"), code=4))
    assert "rollback" in line
    line = one_line(fed.train("bank-a", code=4))
    assert "rollback" in line
    # without the key the check cannot be made, and predict says so
    assert "not checked against this bank's state" in fed.predict(holdout, out).output


def resign(fed, key: str, **changes) -> None:
    """Rewrite a signed document of the store with the coordinator's own key (what an old but genuine one looks like)."""
    path = fed.store / key
    doc = json.loads(path.read_text())
    doc.pop("signature")
    private, _ = keys.load_private(fed.key("coordinator"))
    path.write_bytes(keys.sign_manifest(private, doc | changes))


def test_max_round_age_refuses_a_store_frozen_in_the_past(tmp_path, credit_split):
    text = TEMPLATE.replace("[federation]\n", "[federation]\nmax_round_age = 48\n", 1)
    fed = make_fed(tmp_path, credit_split, text, banks=BANKS[:3])
    assert "max round age" in fed.cli("spec", "show", fed.loc).output
    fed.predict(fed.data / "bank-a.csv", tmp_path / "s.csv")  # fresh: fine
    resign(fed, "rounds/000000/global.json", created_at="2026-01-01T00:00:00+00:00")
    for res in (fed.predict(fed.data / "bank-a.csv", tmp_path / "s.csv", code=4), fed.train("bank-a", code=4)):
        line = one_line(res)
        assert "round 0, published 2026-01-01" in line and "max_round_age of 48 hours" in line and "frozen" in line


def test_status_and_report_with_a_key_refuse_a_rolled_back_store(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    fed.train("bank-a")  # saw round 1
    fed.cli("status", fed.loc, "--key", fed.key("bank-a"))
    shutil.rmtree(fed.store / "rounds/000001")
    line = one_line(fed.cli("status", fed.loc, "--key", fed.key("bank-a"), code=4))
    assert "rollback" in line and "already saw round 1" in line
    out = tmp_path / "r.html"
    one_line(fed.cli("report", fed.loc, "--out", out, "--key", fed.key("bank-a"), code=4))
    assert not out.exists()


def test_deleting_a_published_manifest_never_leads_to_a_second_round_n(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    first = (fed.store / "rounds/000001/global.json").read_bytes()
    (fed.store / "rounds/000001/global.json").unlink()  # the attacker: round 1 looks unpublished again
    line = one_line(fed.aggregate(code=4))
    assert "published round 1" in line and "newest global is round 0" in line and "never signed twice" in line
    assert not (fed.store / "rounds/000001/global.json").exists()
    (fed.store / "rounds/000001/global.json").write_bytes(first)  # restored from backup: the round goes on
    fed.train("bank-a")
    assert "waiting" in fed.aggregate(code=3).output
    state = json.loads((tmp_path / "coordinator/coordinator.fedcli/credit-demo/coordinator.json").read_text())
    assert [p["round"] for p in state["published"]] == [0, 1]


def test_planned_rounds_end_the_federation(tmp_path, credit_split):
    text = TEMPLATE.replace("[federation]\n", "[federation]\nrounds = 1\n", 1)
    fed = make_fed(tmp_path, credit_split, text + DP.removeprefix(TEMPLATE), banks=BANKS)
    for b in BANKS[:3]:
        fed.train(b)
    res = fed.aggregate()
    assert (
        "published global model of round 1" in res.output and "is complete: the planned rounds are done" in res.output
    )
    marker = json.loads((fed.store / "final.json").read_text())
    assert marker["round"] == 1 and marker["reason"] == "rounds" and marker["signature"]
    before = snapshot(fed)
    res = fed.train("bank-d")  # the late bank: nothing trained, nothing spent, exit 0
    assert "federation credit-demo is complete" in res.output and "no privacy budget spent" in res.output
    assert not ledger_file(fed, "bank-d").exists() and snapshot(fed) == before
    assert "is complete" in fed.aggregate().output  # exit 0, not 3 forever
    assert "is complete" in fed.cli("status", fed.loc).output
    (fed.store / "final.json").unlink()  # deleted: bank-d saw the end and refuses to reopen the federation
    assert "no longer shows it" in one_line(fed.train("bank-d", code=4))
    assert not (fed.store / "rounds/000002").exists()
    assert "is complete" in fed.aggregate().output and (fed.store / "final.json").exists()  # signed again
    assert "is complete" in fed.train("bank-d").output


def test_a_forged_final_marker_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    private, _ = keys.load_private(fed.key("bank-a"))
    g = json.loads((fed.store / "rounds/000000/global.json").read_text())
    doc = {"kind": "final", "format": 1, "federation_id": "credit-demo", "spec_sha256": g["spec_sha256"], "round": 0}
    doc |= {"global_sha256": g["tensors_sha256"], "reason": "rounds", "created_at": "2026-01-01T00:00:00+00:00"}
    (fed.store / "final.json").write_bytes(keys.sign_manifest(private, doc))
    line = one_line(fed.train("bank-a", code=4))
    assert "final marker" in line and "signature does not verify" in line
    one_line(fed.aggregate(code=4))
    assert "unverified: final.json is not the coordinator's signed end" in fed.cli("status", fed.loc).output


def test_a_spent_dp_budget_ends_the_federation_instead_of_a_dead_end(tmp_path, credit_split):
    from fedcli.privacy import accounting

    budget = accounting.epsilon_update_level(1.0, 1, 1e-5) + 1e-3  # room for exactly one release
    text = TEMPLATE + f'\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = {budget}\n'
    fed = make_fed(tmp_path, credit_split, text, banks=BANKS)
    for b in BANKS[:3]:
        fed.train(b)
    res = fed.aggregate()
    assert "is complete: the privacy budget is used up" in res.output
    res = fed.train("bank-a")  # would have exited 6; bank-c would have spent epsilon on a round never closed
    assert "is complete" in res.output
    assert "is complete" in fed.train("bank-d").output and not ledger_file(fed, "bank-d").exists()


def plant_lease(fed, hours_ahead: float) -> None:
    now = time.time()
    rec = {
        "state": "held",
        "owner": "ab" * 16,
        "host": "mallory",
        "pid": 4242,
        "at": now,
        "expires": now + hours_ahead * 3600,
    }
    path = fed.store / "locks/aggregate/000000000001.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_a_lease_longer_than_max_lease_minutes_is_taken_over(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    plant_lease(fed, 4)  # 4 hours: within 10 default lease times, beyond the default max_lease_minutes (120)
    assert "published global model of round 1" in fed.aggregate().output


def test_a_lease_within_max_lease_minutes_holds(tmp_path, credit_split):
    text = TEMPLATE.replace("[federation]\n", "[federation]\nmax_lease_minutes = 600\n", 1)
    fed = make_fed(tmp_path, credit_split, text, banks=BANKS[:3])
    plant_lease(fed, 4)
    assert "another run holds the aggregate lock" in fed.aggregate(code=ExitCode.WAITING).output


@pytest.mark.slow
def test_store_copy_moves_a_federation_without_a_rollback_alarm(tmp_path, credit_split, moto_s3, monkeypatch):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    fed.train("bank-a")  # bank-a saw round 1 and is in round 2
    url = use_s3(moto_s3, monkeypatch)
    res = fed.cli("store", "copy", fed.store, url, "--coordinator", fed.pub("coordinator"))
    assert "copied" in res.output and "newest global: round 1" in res.output and "2 lock records left" in res.output
    moved = Fed(fed.root, fed.runner, url)
    assert "already submitted an update for round 2" in moved.train("bank-a").output
    for b in BANKS[1:3]:
        moved.train(b)
    assert "published global model of round 2" in moved.aggregate().output
    moved.predict(fed.data / "bank-a.csv", tmp_path / "s.csv", "--key", fed.key("bank-a"))
    assert "0 objects written, 14 already there" in fed.cli("store", "copy", fed.store, url).output  # idempotent
    other = second_federation(fed)
    line = one_line(fed.cli("store", "copy", other, url, code=1))
    assert "already holds federation.toml with other content" in line


def test_store_copy_refuses_a_source_that_does_not_verify(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    (fed.store / "federation.toml.sig").write_text("forged")
    line = one_line(fed.cli("store", "copy", fed.store, tmp_path / "new", code=4))
    assert "signature" in line and not (tmp_path / "new").exists()


def test_an_old_layout_ledger_is_still_read_and_privacy_asks_which_federation(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    old = fed.key("bank-a").with_suffix(".ledger.json")  # what fedcli kept before per-federation folders
    doc = json.loads(ledger_file(fed, "bank-a").read_text())
    old.write_text(json.dumps({k: doc[k] for k in ("version", "accountant", "entries")}))
    ledger_file(fed, "bank-a").unlink()
    fed.train("bank-a")  # the old ledger's round-1 release counts: no cross-check refusal
    assert [e["round"] for e in json.loads(ledger_file(fed, "bank-a").read_text())["entries"]] == [1, 2]
    assert "over 2 release(s)" in fed.cli("privacy", "--key", fed.key("bank-a")).output
    other = second_federation(fed)
    train_on(fed, other, "bank-a")
    line = one_line(fed.cli("privacy", "--key", fed.key("bank-a"), code=1))
    assert "2 federations (credit-demo, second)" in line and "--ledger" in line


def test_coordinator_state_catches_up_after_a_crash_and_a_damaged_one_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, banks=BANKS[:3])
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    path = tmp_path / "coordinator/coordinator.fedcli/credit-demo/coordinator.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc | {"published": doc["published"][:1]}))  # crashed before recording round 1
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    assert [p["round"] for p in json.loads(path.read_text())["published"]] == [0, 1, 2]
    path.write_text('{"federation_id": "credit-demo", "published": [{"round": 1}]}')
    line = one_line(fed.aggregate(code=1))
    assert str(path) in line and "restore it from backup" in line
