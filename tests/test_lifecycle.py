"""A federation that lives for months (issue 13): per-federation state, the ledger, freshness, the
coordinator's own state, locks, the final marker and moving the store. Everything through the CLI."""

import json
import shutil

from helpers import BANKS, bank_dir, make_fed, one_line, state_file


def second_federation(fed, name: str = "second", banks=BANKS[:3]):
    """Another federation on another store, with the same keys."""
    store = fed.root / f"store-{name}"
    fed.cli(
        "init",
        store,
        "--spec",
        fed.root / "federation.toml",
        "--key",
        fed.key("coordinator"),
        "--id",
        name,
        *[x for b in banks for x in ("--member", fed.pub(b))],
    )
    return store


def train_on(fed, store, bank: str, *extra, code: int = 0):
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
