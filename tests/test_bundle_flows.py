"""Air gap, everything else a federation writes: statistics rounds, holdout evaluations, key rotations
(a bank's and the coordinator's), countersignatures and the final marker all cross through bundles.
Each test plays a bank whose only link to the coordinator is a bundle file, through the CLI."""

import json

import pytest
from helpers import BANKS, TEMPLATE, make_fed, one_line, use_s3
from test_bundle import _forge
from test_chain import amend, newbank
from test_statistics import federated_template

from fedcli import keys
from fedcli.errors import ExitCode
from fedcli.protocol import rounds
from fedcli.store import open_store

HOLDOUT = TEMPLATE.replace("[training]", "[evaluation]\nholdout = 0.2\n\n[training]", 1)


def export(fed, store, key, out, code=0):
    return fed.cli("bundle", "export", "--store", store, "--key", key, "--out", out, code=code)


def import_(fed, bundle, store, pub="coordinator", code=0):
    extra = ["--coordinator", fed.pub(pub)] if pub else []
    return fed.cli("bundle", "import", bundle, "--store", store, *extra, code=code)


def to_mirror(fed, mirror, out, pub="coordinator", key=None):
    """The coordinator exports, the bank imports into its mirror (pinning `pub`)."""
    export(fed, fed.store, key or fed.key("coordinator"), out)
    return import_(fed, out, mirror, pub=pub)


def to_exchange(fed, mirror, bank, out, key=None):
    """The bank exports from its mirror, the coordinator imports into the exchange store."""
    said = export(fed, mirror, key or fed.key(bank), out).output
    return said + import_(fed, out, fed.store, pub=None).output


def train_on(fed, store, bank, key=None, pub="coordinator", code=0):
    return fed.cli(
        "train",
        "--store",
        store,
        "--key",
        key or fed.key(bank),
        "--data",
        fed.data / f"{bank}.csv",
        "--coordinator",
        fed.pub(pub),
        code=code,
    )


def same(fed, mirror, key):
    return (mirror / key).read_bytes() == (fed.store / key).read_bytes()


def test_an_air_gapped_bank_takes_part_in_the_statistics_round(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split, federated_template())
    mirror = tmp_path / "mirror-a"
    res = to_mirror(fed, mirror, tmp_path / "spec.bundle")  # no global yet: the spec alone crosses
    assert "federation.toml" in res.output and not (mirror / "rounds").exists()
    said = fed.cli(
        "stats",
        "submit",
        "--store",
        mirror,
        "--key",
        fed.key("bank-a"),
        "--data",
        fed.data / "bank-a.csv",
        "--coordinator",
        fed.pub("coordinator"),
    ).output
    assert "submitted statistics of" in said
    (contribution,) = (mirror / "statistics").glob("*/bank-a.json")
    key = str(contribution.relative_to(mirror))
    said = to_exchange(fed, mirror, "bank-a", tmp_path / "a-stats.bundle")
    assert key in said and same(fed, mirror, key)
    replay = tmp_path / "replay.bundle"  # the same signed contribution under another spec's folder
    _forge(fed, replay, "bank-a", {"statistics/ffffffffffffffff/bank-a.json": contribution.read_bytes()})
    assert "another spec version" in one_line(import_(fed, replay, fed.store, pub=None, code=ExitCode.VERIFY))
    for b in BANKS[1:3]:
        fed.cli(
            "stats",
            "submit",
            "--store",
            fed.store,
            "--key",
            fed.key(b),
            "--data",
            fed.data / f"{b}.csv",
            "--coordinator",
            fed.pub("coordinator"),
        )
    res = fed.cli("stats", "aggregate", "--store", fed.store, "--key", fed.key("coordinator"))
    assert "published the statistics of 3 contributions" in res.output
    assert "bank-a" in json.loads((fed.store / "statistics/statistics.json").read_text())["contributors"]
    res = to_mirror(fed, mirror, tmp_path / "global-0.bundle")  # the statistics and round 0 cross together
    assert "statistics/statistics.json" in res.output and same(fed, mirror, "statistics/statistics.json")
    assert "submitted update for round 1" in train_on(fed, mirror, "bank-a").output
    assert "rounds/000001/updates/bank-a.json" in to_exchange(fed, mirror, "bank-a", tmp_path / "a-1.bundle")


def test_an_air_gapped_bank_publishes_its_holdout_evaluation(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split, HOLDOUT)
    mirror = tmp_path / "mirror-a"
    to_mirror(fed, mirror, tmp_path / "g0.bundle")
    assert "published the signed holdout evaluation of round 0" in train_on(fed, mirror, "bank-a").output
    key = "rounds/000000/evaluations/bank-a.json"
    said = to_exchange(fed, mirror, "bank-a", tmp_path / "a1.bundle")
    assert key in said and same(fed, mirror, key)
    status = fed.cli("status", fed.store, "--coordinator", fed.pub("coordinator")).output
    assert "holdout AUC per bank" in status and "ignored" not in status


def test_a_bank_rotates_its_key_across_the_gap(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split)
    mirror = tmp_path / "mirror-a"
    to_mirror(fed, mirror, tmp_path / "g0.bundle")
    new_pub = newbank(fed, "bank-a", folder="bank-a-2026")
    new_key = fed.root / "bank-a-2026" / "bank-a.key"
    fed.cli("spec", "rotate-key", str(mirror), "--key", fed.key("bank-a"), "--new", new_pub)
    said = to_exchange(fed, mirror, "bank-a", tmp_path / "rot.bundle")  # nothing trained: the statement alone
    assert "specs/rotations/bank-a/" in said
    assert "rotate: bank-a" in amend(fed, "--member", new_pub).output
    to_mirror(fed, mirror, tmp_path / "v2.bundle")  # version 2 reaches the mirror
    assert "submitted update for round 1" in train_on(fed, mirror, "bank-a", key=new_key).output
    said = to_exchange(fed, mirror, "bank-a", tmp_path / "a1.bundle", key=new_key)
    assert "rounds/000001/updates/bank-a.json" in said
    assert "specs/rotations" not in said and "not packed" not in said  # the statement in force stays home
    old = export(fed, mirror, fed.key("bank-a"), tmp_path / "old.bundle", code=1)  # the old key no longer speaks
    assert "neither the coordinator nor a member" in one_line(old)


def test_after_a_coordinator_rotation_the_new_key_exports_and_mirrors_follow(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split)
    behind, empty = tmp_path / "mirror-a", tmp_path / "mirror-b"
    to_mirror(fed, behind, tmp_path / "g0.bundle")  # pinned to the old key, has version 1 only
    newbank(fed, "coordinator2")
    amend(fed, "--new-key", fed.key("coordinator2"))
    old = export(fed, fed.store, fed.key("coordinator"), tmp_path / "x.bundle", code=ExitCode.VERIFY)
    assert "rotated out" in one_line(old) and not (tmp_path / "x.bundle").exists()
    out = tmp_path / "v2.bundle"
    res = export(fed, fed.store, fed.key("coordinator2"), out)
    assert "specs/000002/link.json" in res.output
    assert "signed by coordinator2" in import_(fed, out, behind).output  # walks from the old pin
    assert "signed by coordinator2" in import_(fed, out, empty).output  # an empty mirror pinned to the old key
    assert same(fed, empty, "specs/000002/link.json")
    for mirror, bank in ((behind, "bank-a"), (empty, "bank-b")):
        assert "submitted update for round 1" in train_on(fed, mirror, bank).output
        assert f"rounds/000001/updates/{bank}.json" in to_exchange(fed, mirror, bank, tmp_path / f"{bank}.bundle")
    fed.train("bank-c")
    res = fed.cli("aggregate", "--store", fed.store, "--key", fed.key("coordinator2"))
    assert "published global model of round 1" in res.output
    # a bundle signed by the rotated-out key is refused by a mirror that knows version 2
    stale = tmp_path / "stale.bundle"
    _forge(fed, stale, "coordinator", {rounds.rejections_key(1): b"{}"}, role="coordinator")
    assert "who is not in federation" in one_line(import_(fed, stale, behind, code=ExitCode.VERIFY))


def test_a_bank_countersigns_across_the_gap(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split, TEMPLATE.replace("deadline_minutes = 0", "roster_countersign = 2"))
    mirror = tmp_path / "mirror-a"
    assert "awaits countersignatures" in amend(fed, "--member", newbank(fed, "bank-e")).output
    to_mirror(fed, mirror, tmp_path / "v2.bundle")
    fed.cli("spec", "countersign", str(mirror), "--key", fed.key("bank-a"))
    said = to_exchange(fed, mirror, "bank-a", tmp_path / "cs.bundle")
    assert "specs/000002/countersign/bank-a.json" in said
    fed.cli("spec", "countersign", fed.loc, "--key", fed.key("bank-b"))
    assert "awaits" not in fed.cli("spec", "show", fed.loc, "--coordinator", fed.pub("coordinator")).output


def test_the_final_marker_reaches_the_bank(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split, TEMPLATE.replace("[federation]\n", "[federation]\nrounds = 1\n", 1))
    mirror = tmp_path / "mirror-d"
    to_mirror(fed, mirror, tmp_path / "g0.bundle")
    for b in BANKS[:3]:
        fed.train(b)
    assert "is complete" in fed.aggregate().output
    res = to_mirror(fed, mirror, tmp_path / "g1.bundle")
    assert "final.json" in res.output and same(fed, mirror, "final.json")
    assert "federation credit-demo is complete" in train_on(fed, mirror, "bank-d").output


# --------------------------------------------------------------------------- hostile


def _signed(fed, signer, doc):
    private, _ = keys.load_private(fed.key(signer))
    return keys.sign_manifest(private, doc)


@pytest.fixture
def evaluated(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split, HOLDOUT)
    fed.train("bank-b")
    return fed


def test_a_bank_bundle_carrying_another_members_file_is_refused(evaluated, tmp_path):
    fed = evaluated
    theirs = "rounds/000000/evaluations/bank-b.json"
    data = (fed.store / theirs).read_bytes()
    (fed.store / theirs).unlink()
    for key in (theirs, "statistics/0123456789abcdef/bank-b.json", f"specs/rotations/bank-b/{'0' * 16}.json"):
        bad = tmp_path / "planted.bundle"
        _forge(fed, bad, "bank-a", {key: data})
        line = one_line(import_(fed, bad, fed.store, pub=None, code=ExitCode.VERIFY))
        assert f"bank-a may not write {key}" in line
    assert not (fed.store / theirs).exists()


def test_a_document_at_the_banks_own_place_must_be_signed_by_it(evaluated, tmp_path):
    fed = evaluated
    doc = json.loads((fed.store / "rounds/000000/evaluations/bank-b.json").read_text())
    doc.pop("signature")
    mine = "rounds/000000/evaluations/bank-a.json"
    cases = [
        (_signed(fed, "bank-b", {**doc, "member": "bank-a"}), "signature"),  # another member's key
        (_signed(fed, "bank-a", doc), "member is 'bank-b'"),  # its own key, someone else's name
        (_signed(fed, "bank-a", {**doc, "member": "bank-a", "federation_id": "other"}), "federation_id"),
    ]
    for data, message in cases:
        bad = tmp_path / "forged.bundle"
        _forge(fed, bad, "bank-a", {mine: data})
        assert message in one_line(import_(fed, bad, fed.store, pub=None, code=ExitCode.VERIFY))
        assert not (fed.store / mine).exists()


def test_export_leaves_out_a_file_planted_at_the_banks_place(evaluated, tmp_path):
    """Someone with write access to the bank's mirror plants a file under bank-a's name: it never leaves."""
    fed = evaluated
    fed.train("bank-a")
    planted = fed.store / "rounds/000000/evaluations/bank-a.json"
    planted.write_bytes((fed.store / "rounds/000000/evaluations/bank-b.json").read_bytes())
    res = export(fed, fed.store, fed.key("bank-a"), tmp_path / "a.bundle")
    assert "rounds/000000/evaluations/bank-a.json not packed" in res.output
    names = [
        f["key"]
        for f in json.loads(
            __import__("tarfile").open(tmp_path / "a.bundle").extractfile("bundle.json").read()  # type: ignore[union-attr]
        )["files"]
    ]
    assert "rounds/000001/updates/bank-a.json" in names and "rounds/000000/evaluations/bank-a.json" not in names


def test_a_forged_statistics_document_or_final_marker_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split)
    mirror = tmp_path / "mirror"
    to_mirror(fed, mirror, tmp_path / "g0.bundle")
    forged = {"kind": "final", "format": 1, "federation_id": "credit-demo", "round": 0}
    for key, signer in (("final.json", "bank-a"), ("statistics/statistics.json", "bank-a")):
        bad = tmp_path / "f.bundle"
        _forge(fed, bad, "coordinator", {key: _signed(fed, signer, forged)}, role="coordinator")
        line = one_line(import_(fed, bad, mirror, code=ExitCode.VERIFY))
        assert "signature" in line or "statistics" in line
        assert not (mirror / key).exists()
    assert rounds.latest_round(open_store(str(mirror))) == 0


def test_spec_files_read_before_the_signature_are_bounded_in_total(tmp_path, credit_split, monkeypatch):
    """A bundle's spec files are read to find who may sign it: never more than MAX_SPEC_FILES_BYTES in all."""
    from fedcli.store import bundle

    fed = make_fed(tmp_path / "fed", credit_split)
    out = tmp_path / "g0.bundle"
    export(fed, fed.store, fed.key("coordinator"), out)
    monkeypatch.setattr(bundle, "MAX_SPEC_FILES_BYTES", 100)
    line = one_line(import_(fed, out, tmp_path / "mirror", code=ExitCode.VERIFY))
    assert "spec files are larger than" in line and not (tmp_path / "mirror").exists()


def test_a_forged_spec_version_in_a_bundle_is_refused_by_the_chain_walk(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split)
    mirror = tmp_path / "mirror"
    to_mirror(fed, mirror, tmp_path / "g0.bundle")
    spec = (fed.store / "federation.toml").read_bytes()
    link = _signed(fed, "bank-a", {"kind": "spec-version", "version": 2})  # a member signs a "new version"
    bad = tmp_path / "v2.bundle"
    _forge(fed, bad, "bank-a", {"specs/000002/federation.toml": spec, "specs/000002/link.json": link})
    line = one_line(import_(fed, bad, mirror, code=ExitCode.VERIFY))
    assert "spec version 2" in line and not (mirror / "specs").exists(), line


@pytest.mark.slow
def test_a_masked_statistics_round_with_the_bank_mirror_on_s3(tmp_path, credit_split, moto_s3, monkeypatch):
    """Secure aggregation's statistics round needs every member: the air-gapped one through bundles, its mirror on S3."""
    secagg = "\n[secagg]\nenabled = true\n"
    fed = make_fed(tmp_path / "fed", credit_split, federated_template(secagg, ranges=True, levels=True))
    mirror = use_s3(moto_s3, monkeypatch)
    to_mirror(fed, mirror, tmp_path / "spec.bundle")
    for b in BANKS:
        store = mirror if b == "bank-a" else fed.store
        res = fed.cli(
            "stats",
            "submit",
            "--store",
            store,
            "--key",
            fed.key(b),
            "--data",
            fed.data / f"{b}.csv",
            "--coordinator",
            fed.pub("coordinator"),
        )
        assert "masked for secure aggregation" in res.output
    res = fed.cli("stats", "aggregate", "--store", fed.store, "--key", fed.key("coordinator"), code=3)
    assert "needs every member's" in res.output  # bank-a's contribution is still behind the gap
    assert "statistics/" in to_exchange(fed, mirror, "bank-a", tmp_path / "a.bundle")
    fed.cli("stats", "aggregate", "--store", fed.store, "--key", fed.key("coordinator"))
    assert json.loads((fed.store / "statistics/statistics.json").read_text())["encoding"] == "masked"
    to_mirror(fed, mirror, tmp_path / "g0.bundle")
    s3 = open_store(mirror)
    assert (
        s3.get("statistics/statistics.json", max_bytes=1 << 16)
        == (fed.store / "statistics/statistics.json").read_bytes()
    )
    assert "submitted update for round 1" in train_on(fed, mirror, "bank-a").output


def test_an_import_writes_what_others_name_before_them(tmp_path):
    """Spec and statistics before the globals checked by them, tensors before manifests, the final marker last:
    an import cut short at any write never leaves a document naming one that is not there yet."""
    from fedcli.store.bundle import BundleResult, _write
    from fedcli.store.folder import FolderStore

    class Recording(FolderStore):
        def put(self, key, data, *, create_only=False):
            self.order.append(key)
            super().put(key, data, create_only=create_only)

    store = Recording(tmp_path / "mirror")
    store.order = []
    keys_ = [
        "final.json",
        "rounds/000001/global.json",
        "rounds/000001/rejections.json",
        "rounds/000001/global.safetensors",
        "statistics/statistics.json",
        "specs/000002/link.json",
        "federation.toml",
    ]
    _write(store, {k: k.encode() for k in keys_}, BundleResult(tmp_path, "c", "coordinator", "f"))
    assert store.order == [
        "federation.toml",
        "specs/000002/link.json",
        "statistics/statistics.json",
        "rounds/000001/global.safetensors",
        "rounds/000001/rejections.json",
        "rounds/000001/global.json",
        "final.json",
    ]
