"""The versioned spec (protocol/chain.py): amend, join/leave at a round boundary, key rotation,
countersigned roster changes, and every way a walker refuses the chain; and a bank's policy pinning
(bank/pinning.py). All through the CLI."""

import json
import shutil
import tomllib

import tomli_w

import pytest
from helpers import TEMPLATE, make_fed, one_line, snapshot, use_s3

from fedcli import keys


def amend(fed, *args, code=0, key="coordinator"):
    return fed.cli("spec", "amend", fed.loc, "--key", fed.key(key), *args, code=code)


def show(fed, pub="coordinator", code=0):
    return fed.cli("spec", "show", fed.loc, "--coordinator", fed.pub(pub), code=code)


def newbank(fed, name, folder=None):
    """A key pair NAME in root/folder (default root/name)."""
    fed.cli("keygen", name, "--out", fed.root / (folder or name))
    return fed.root / (folder or name) / f"{name}.pub"


def train_as(fed, key, data_bank, *extra, code=0):
    return fed.cli(
        "train",
        "--store",
        fed.loc,
        "--key",
        key,
        "--data",
        fed.data / f"{data_bank}.csv",
        "--coordinator",
        fed.pub("coordinator"),
        *extra,
        code=code,
    )


def round_one(fed, banks=("bank-a", "bank-b", "bank-c")):
    for b in banks:
        fed.train(b)
    fed.aggregate()


# --------------------------------------------------------------------------- amend and walk (fast)


def test_amend_publishes_version_2_that_spec_show_verifies(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    res = amend(fed, "--member", newbank(fed, "bank-e"))
    assert "join: bank-e" in res.output and "spec version 2 published; applies from round 1" in res.output
    link = json.loads((fed.store / "specs/000002/link.json").read_text())
    assert link["version"] == 2 and link["effective_round"] == 1 and set(link["signatures"]) == {"previous"}
    out = show(fed).output
    assert "bank-e" in out and "spec version 2 of 2, in force from round 1" in out
    amend(fed, "--remove", "bank-e", "--effective-round", "3")
    assert "spec version 2 of 3, in force from round 1; announced: version 3 from round 3" in show(fed).output


def test_amend_with_a_key_that_is_not_the_coordinators_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    before = snapshot(fed)
    res = amend(fed, key="bank-a", code=4)
    assert "is not the coordinator key of spec version 1" in one_line(res)
    assert snapshot(fed) == before


def test_a_gap_in_the_chain_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    amend(fed, "--remove", "bank-e")
    (fed.store / "specs/000002/link.json").unlink()
    assert "version 2 is missing before version 3" in one_line(show(fed, code=4))


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("effective_round", "signature does not verify"),
        ("signature", "signature does not verify"),
        ("spec", "does not match the sha256"),
        ("prev", "signature does not verify"),
    ],
)
def test_a_tampered_version_is_refused(tmp_path, credit_split, tamper, message):
    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    path = fed.store / "specs/000002/link.json"
    link = json.loads(path.read_text())
    if tamper == "effective_round":
        link["effective_round"] = 7
    elif tamper == "signature":
        link["signatures"]["previous"] = link["signatures"]["previous"][::-1]
    elif tamper == "prev":
        link["prev_spec_sha256"] = "0" * 64
    if tamper == "spec":
        spec = fed.store / "specs/000002/federation.toml"
        spec.write_text(spec.read_text().replace("epochs = 3", "epochs = 4"))
    else:
        path.write_text(json.dumps(link))
    assert message in one_line(show(fed, code=4))


def test_a_link_signed_by_anyone_but_the_previous_coordinator_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    path = fed.store / "specs/000002/link.json"
    link = json.loads(path.read_text())
    del link["signatures"]
    forger, _ = keys.load_private(fed.key("bank-a"))  # a member re-signs the link: not the coordinator
    from fedcli.protocol.chain import sign_link

    path.write_bytes(sign_link(link, forger, None))
    assert "the coordinator of the version before" in one_line(show(fed, code=4))


def test_coordinator_key_rotation_is_signed_by_both_keys_and_both_pins_work(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    new = newbank(fed, "coordinator2")
    res = amend(fed, "--new-key", fed.key("coordinator2"))
    assert "spec version 2 published" in res.output
    link = json.loads((fed.store / "specs/000002/link.json").read_text())
    assert set(link["signatures"]) == {"previous", "next"}
    show(fed)  # pinned to the old key: walks from version 1
    show(fed, pub="coordinator2")  # pinned to the new one: version 2 is signed by it
    assert new.exists()
    # the old key no longer amends; the new one does
    assert "not the coordinator key of spec version 2" in one_line(amend(fed, code=4))
    amend(fed, "--member", newbank(fed, "bank-e"), key="coordinator2")
    # a version claiming the new key without its signature is refused
    path = fed.store / "specs/000002/link.json"
    link = json.loads(path.read_text())
    del link["signatures"]["next"]
    path.write_text(json.dumps(link))
    assert "not signed by the new coordinator key" in one_line(show(fed, code=4))


def test_a_pin_no_version_carries_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    res = show(fed, pub="bank-a", code=4)
    assert "no version of it is signed with the pinned coordinator key" in one_line(res)


def test_effective_round_cannot_be_a_published_round(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    assert "nothing to amend" in one_line(amend(fed, code=1))
    res = amend(fed, "--effective-round", "1", "--remove", "bank-d")
    assert "applies from round 1" in res.output
    # round 0 is published: a version never applies to it (the option's own range refuses 0)
    amend(fed, "--effective-round", "0", code=2)


def test_the_federation_id_cannot_change(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    other = tmp_path / "other.toml"
    other.write_text(TEMPLATE.replace('id = "credit-demo"', 'id = "other"'))
    assert "id must stay 'credit-demo'" in one_line(amend(fed, "--file", other, code=1))


# --------------------------------------------------------------------------- roster changes over rounds


@pytest.mark.slow
def test_members_join_and_leave_at_a_round_boundary(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    round_one(fed)
    res = amend(fed, "--member", newbank(fed, "bank-e"), "--remove", "bank-d")
    assert "applies from round 2" in res.output
    train_as(fed, fed.key("bank-e"), "bank-a")
    assert "is not enrolled" in one_line(fed.train("bank-d", code=1))
    fed.train("bank-a")
    fed.train("bank-b")
    fed.aggregate()
    g2 = json.loads((fed.store / "rounds/000002/global.json").read_text())
    assert {c["member"] for c in g2["contributors"]} == {"bank-a", "bank-b", "bank-e"}
    g1 = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert g1["spec_sha256"] != g2["spec_sha256"]  # each global names the version it was made under
    status = fed.cli("status", fed.loc, "--coordinator", fed.pub("coordinator")).output
    assert "│     2 │ published │" in status  # every round verifies under the version in force for it


@pytest.mark.slow
def test_a_roster_change_waits_for_countersignatures(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace("deadline_minutes = 0", "roster_countersign = 2"))
    res = amend(fed, "--member", newbank(fed, "bank-e"))
    assert "awaits countersignatures" in res.output
    assert "is not enrolled" in one_line(train_as(fed, fed.key("bank-e"), "bank-a", code=1))
    assert "still awaits countersignatures" in one_line(amend(fed, code=1))
    # round 1 is the new version's: nobody plays it under the old one meanwhile (exit 3, cron tries later)
    assert "awaits countersignatures (0 of 2) before round 1" in fed.train("bank-a", code=3).output
    assert "awaits countersignatures" in fed.aggregate(code=3).output
    bad = fed.cli("spec", "countersign", fed.loc, "--key", fed.key("bank-e"), code=1)
    assert "only its members countersign" in one_line(bad)
    fed.cli("spec", "countersign", fed.loc, "--key", fed.key("bank-a"))
    assert "bank-e" not in show(fed).output.split("roster")[-1]
    fed.cli("spec", "countersign", fed.loc, "--key", fed.key("bank-b"))
    train_as(fed, fed.key("bank-e"), "bank-a")
    # a forged countersignature (bank-c's name, bank-e's key) does not count
    assert (fed.store / "specs/000002/countersign/bank-a.json").exists()


@pytest.mark.slow
def test_a_member_rotates_its_key_with_a_statement_signed_by_the_old_one(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace("deadline_minutes = 0", "roster_countersign = 3"))
    new_pub = newbank(fed, "bank-a", folder="bank-a-2026")
    new_key = fed.root / "bank-a-2026" / "bank-a.key"
    fed.cli("spec", "rotate-key", fed.loc, "--key", fed.key("bank-a"), "--new", new_pub)
    res = amend(fed, "--member", new_pub)
    assert "rotate: bank-a" in res.output and "published" in res.output  # no countersignature needed
    train_as(fed, new_key, "bank-a")
    assert "is not enrolled" in one_line(fed.train("bank-a", code=1))
    # a key change without a statement is a replacement: a roster change that needs countersigning
    other = newbank(fed, "bank-b", folder="bank-b-new")
    assert "awaits countersignatures" in amend(fed, "--member", other).output


# --------------------------------------------------------------------------- forks and rollback


@pytest.mark.slow
def test_a_bank_and_the_coordinator_refuse_a_forked_or_rolled_back_chain(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    fed.train("bank-a")  # bank-a now trusts version 2
    shutil.rmtree(fed.store / "specs")  # someone with write access deletes version 2
    assert "already trusted version 2" in one_line(fed.train("bank-a", code=4))
    assert "already trusted version 2" in one_line(fed.aggregate(code=4))  # the coordinator's own record
    assert "already trusted version 2" in one_line(amend(fed, "--remove", "bank-d", code=4))  # no fork by amend
    # a thief with a copy of the coordinator key (but not its record) publishes another version 2
    (tmp_path / "thief").mkdir()
    shutil.copy(fed.key("coordinator"), tmp_path / "thief" / "coordinator.key")
    fed.cli("spec", "amend", fed.loc, "--key", tmp_path / "thief" / "coordinator.key", "--remove", "bank-d")
    line = one_line(fed.train("bank-a", code=4))  # the rollback check sees round 0 was signed under another spec
    assert "not the one this key trusted" in line or "spec_sha256" in line
    assert "not the one this key trusted" in one_line(fed.aggregate(code=4))


# --------------------------------------------------------------------------- policy pinning


DP = '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = 50\n'


@pytest.mark.slow
def test_a_version_that_drops_dp_is_refused_until_accepted(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE + DP)
    fed.train("bank-a")
    weaker = tmp_path / "no-dp.toml"
    weaker.write_text(TEMPLATE)
    amend(fed, "--file", weaker, "--effective-round", "2")
    fed.train("bank-b")
    fed.train("bank-c")
    fed.aggregate()  # round 1 under version 1 (DP)
    before = snapshot(fed)
    res = fed.train("bank-a", code=4)
    line = one_line(res)
    assert "weakens what this bank agreed to in version 1" in line and "--accept-spec-version 2" in line
    assert "differential privacy" in res.output and "version 2" in res.output  # the difference, as a table
    assert snapshot(fed) == before
    assert "weakens" in one_line(fed.train("bank-d", code=4))  # a bank with no record: it agreed to version 1
    res = fed.train("bank-a", "--accept-spec-version", "2")
    assert "submitted update for round 2" in res.output
    fed.train("bank-a")  # accepted once, remembered


SECAGG = DP + "\n[secagg]\nenabled = true\nclip = 1.0\n"


@pytest.mark.parametrize(
    "change, shown",
    [
        (lambda t: t.replace("[secagg]\nenabled = true", "[secagg]\nenabled = false"), "secure aggregation"),
        (lambda t: t.replace("budget_epsilon = 50", "budget_epsilon = 80"), "DP budget epsilon"),
        (lambda t: t.replace("noise_multiplier = 1.0", "noise_multiplier = 0.5"), "DP noise"),
        (lambda t: t.replace("seed = 42", "seed = 43"), "model"),
    ],
)
def test_a_bank_refuses_a_weaker_version_before_reading_its_table(tmp_path, credit_split, change, shown):
    fed = make_fed(tmp_path, credit_split, TEMPLATE + SECAGG)
    weaker = tmp_path / "weaker.toml"
    weaker.write_text(change(TEMPLATE + SECAGG))
    amend(fed, "--file", weaker)
    before = snapshot(fed)
    res = fed.train("bank-a", code=4)
    assert "--accept-spec-version 2" in one_line(res) and shown in res.output
    assert snapshot(fed) == before


def test_a_stronger_version_needs_no_acceptance(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE + SECAGG)
    stronger = tmp_path / "stronger.toml"
    stronger.write_text((TEMPLATE + SECAGG).replace("budget_epsilon = 50", "budget_epsilon = 20"))
    amend(fed, "--file", stronger)
    res = fed.train("bank-a")
    assert "weakens" not in res.output and "submitted update for round 1" in res.output


@pytest.mark.slow
def test_a_coordinator_resigning_the_spec_without_protections_sends_nothing(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE + SECAGG)
    fed.train("bank-a")
    # the coordinator (or anyone with its key) rewrites version 1 in place, without [secagg] and [privacy]
    raw = tomllib.loads((fed.store / "federation.toml").read_text())
    del raw["privacy"], raw["secagg"]
    stripped = tomli_w.dumps(raw).encode()
    private, _ = keys.load_private(fed.key("coordinator"))
    (fed.store / "federation.toml").write_bytes(stripped)
    (fed.store / "federation.toml.sig").write_text(keys.sign_bytes(private, stripped))
    before = snapshot(fed)
    line = one_line(fed.train("bank-a", code=4))  # the rollback check sees round 0 was signed under another spec
    assert "not the one this key trusted" in line or "spec_sha256" in line
    # a bank with no record yet: round 0's signed global still names the spec it was made under
    assert "spec_sha256" in one_line(fed.train("bank-b", code=4))
    assert snapshot(fed) == before


def test_amend_refuses_a_model_the_published_globals_cannot_train(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    other = tmp_path / "mlp.toml"
    other.write_text(TEMPLATE.replace('kind = "logreg"', 'kind = "mlp"'))
    before = snapshot(fed)
    assert "model's shape changes" in one_line(amend(fed, "--file", other, code=1))
    assert snapshot(fed) == before


def test_amend_refuses_removing_a_stranger(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    assert "--remove bank-z: no member of that name" in one_line(amend(fed, "--remove", "bank-z", code=1))


@pytest.mark.parametrize(
    "planted, message",
    [
        (b'{"member": "bank-a", "old_ed25519": "OLD", "n": 1e400, "signature": "AA=="}', "too large to be finite"),
        (b"[1, 2]", "not a JSON object"),
        (b"{" * 100, ""),
    ],
)
def test_a_planted_rotation_statement_is_refused_with_one_line(tmp_path, credit_split, planted, message):
    fed = make_fed(tmp_path, credit_split)
    new_pub = newbank(fed, "bank-a", folder="bank-a-new")
    new_id = keys.load_public(new_pub).ed25519
    from fedcli.protocol.chain import rotation_key

    path = fed.store / rotation_key("bank-a", new_id)
    path.parent.mkdir(parents=True)
    path.write_bytes(planted.replace(b"OLD", keys.load_public(fed.pub("bank-a")).ed25519.encode()))
    before = snapshot(fed)
    res = amend(fed, "--member", new_pub, code=4)
    assert message in one_line(res)
    assert snapshot(fed) == before


def test_a_rotation_statement_signed_by_another_key_does_not_count(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace("deadline_minutes = 0", "roster_countersign = 2"))
    new_pub = newbank(fed, "bank-a", folder="bank-a-new")
    new_id = keys.load_public(new_pub).ed25519
    old_id = keys.load_public(fed.pub("bank-a")).ed25519
    from fedcli.protocol.chain import rotation_key, rotation_statement

    thief, _ = keys.load_private(fed.key("bank-b"))  # bank-b forges bank-a's rotation
    path = fed.store / rotation_key("bank-a", new_id)
    path.parent.mkdir(parents=True)
    path.write_bytes(rotation_statement(thief, "credit-demo", "bank-a", old_id, new_id))
    assert "signature does not verify with bank-a's key" in one_line(amend(fed, "--member", new_pub, code=4))


@pytest.mark.slow
def test_the_chain_on_s3_join_then_rotate_the_coordinator(moto_s3, tmp_path, credit_split, monkeypatch):
    fed = make_fed(tmp_path, credit_split, url=use_s3(moto_s3, monkeypatch))
    amend(fed, "--member", newbank(fed, "bank-e"))
    newbank(fed, "coordinator2")
    amend(fed, "--new-key", fed.key("coordinator2"), "--effective-round", "2")
    for b in ("bank-a", "bank-b"):
        fed.train(b)
    train_as(fed, fed.key("bank-e"), "bank-c")
    fed.aggregate()  # round 1: version 2, still the first coordinator's
    assert "not the coordinator key" in one_line(fed.aggregate(code=4))  # round 2 is version 3's
    for b in ("bank-a", "bank-b", "bank-c"):
        fed.train(b)
    fed.cli("aggregate", "--store", fed.loc, "--key", fed.key("coordinator2"))
    res = fed.cli("audit", fed.loc, "--coordinator", fed.pub("coordinator"), "--out", tmp_path / "audit")
    assert "audit passed: 3 spec version(s), 3 round(s)" in res.output


@pytest.mark.slow
def test_an_update_made_under_the_version_before_is_refused_in_a_round_under_the_new_one(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    fed.train("bank-a")  # round 1 under version 1
    assert "applies from round 2" in amend(fed, "--member", newbank(fed, "bank-e")).output  # the default waits
    # the operator withdraws that version before anyone used it (and the coordinator's record of it)
    (fed.store / "specs").rename(tmp_path / "specs-default")
    fed.key("coordinator").with_suffix(".chain.json").unlink()
    amend(fed, "--member", fed.pub("bank-e"), "--effective-round", "1")  # the operator insists on round 1
    for b in ("bank-b", "bank-c"):
        fed.train(b)
    train_as(fed, fed.key("bank-e"), "bank-d")
    res = fed.aggregate()
    assert "bank-a" in res.output
    rejections = json.loads((fed.store / "rounds/000001/rejections.json").read_text())["entries"]
    assert rejections["bank-a"]["reason"] == "wrong-round" and "another version" in rejections["bank-a"]["message"]


@pytest.mark.slow
def test_a_bundle_carries_the_spec_versions_to_a_mirror(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    out = tmp_path / "global-0.bundle"
    res = fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out)
    assert "specs/000002/link.json" in res.output
    mirror = tmp_path / "mirror"
    fed.cli("bundle", "import", out, "--store", mirror, "--coordinator", fed.pub("coordinator"))
    assert "spec version 2 of 2" in fed.cli("spec", "show", mirror, "--coordinator", fed.pub("coordinator")).output
    fed.train("bank-a", store=mirror)
    v2 = json.loads((fed.store / "specs/000002/link.json").read_text())["spec_sha256"]
    assert json.loads((mirror / "rounds/000001/updates/bank-a.json").read_text())["spec_sha256"] == v2
    # a version planted into a coordinator bundle's mirror copy is refused by the walk, as on any store
    link = mirror / "specs/000002/link.json"
    link.write_text(link.read_text().replace('"effective_round":1', '"effective_round":2'))
    assert "signature" in one_line(fed.cli("spec", "show", mirror, code=4))


def test_after_a_coordinator_rotation_bundle_export_says_what_to_do_in_one_line(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    newbank(fed, "coordinator2")
    amend(fed, "--new-key", fed.key("coordinator2"))
    res = fed.cli(
        "bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", tmp_path / "b", code=None
    )
    assert res.exit_code != 0 and "export with the new coordinator key" in one_line(res)
    fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator2"), "--out", tmp_path / "b")
    assert (tmp_path / "b").exists()  # the new key exports (tests/test_bundle_flows.py follows it to the banks)


@pytest.mark.slow
def test_mutated_links_and_spec_versions_fail_with_one_line(tmp_path, credit_split):
    """Any bytes at a version's link or spec file: exit 4 with one line, never a traceback."""
    import numpy as np

    fed = make_fed(tmp_path, credit_split)
    amend(fed, "--member", newbank(fed, "bank-e"))
    rng = np.random.default_rng(13)
    for name in ("link.json", "federation.toml"):
        path = fed.store / "specs/000002" / name
        original = path.read_bytes()
        for _ in range(40):
            data = bytearray(original)
            for i in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                data[i] = int(rng.integers(0, 256))
            path.write_bytes(bytes(data[: int(rng.integers(1, len(data) + 1))]))
            res = show(fed, code=None)
            assert res.exit_code in (0, 4), res.output
            if res.exit_code:
                one_line(res)
        path.write_bytes(original)
    show(fed)


def test_an_older_global_is_scored_with_the_preprocessing_of_the_version_it_was_trained_under(tmp_path, credit_split):
    """A later version may move a feature's declared mean; evaluating round 1 must still standardise as round 1 did."""
    fed = make_fed(tmp_path, credit_split)
    for b in ("bank-a", "bank-b", "bank-c"):
        fed.train(b)
    fed.aggregate()
    before = fed.evaluate(fed.data / "test.csv", "--round", "1").output
    moved = tmp_path / "moved.toml"
    moved.write_text(TEMPLATE.replace("mean = 9.132939", "mean = 29.132939", 1))
    amend(fed, "--file", moved, "--effective-round", "2")
    assert "spec version 2 of 2" in show(fed).output or "announced: version 2" in show(fed).output
    after = fed.evaluate(fed.data / "test.csv", "--round", "1").output
    assert after == before  # the same numbers: version 1's means for the global version 1 trained
