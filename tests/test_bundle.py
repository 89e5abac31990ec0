"""Air gap: signed bundles carry a whole round between stores that never see each other."""

import io
import json
import tarfile

import pytest
from helpers import BANKS, make_fed, use_s3

from fedcli import keys
from fedcli.errors import ExitCode
from fedcli.protocol import rounds
from fedcli.store import open_store
from fedcli.store.bundle import BUNDLE_DOMAIN, _write_tar


@pytest.fixture
def fed(tmp_path, credit_split):
    return make_fed(tmp_path, credit_split)


def _export(fed, store, who, out):
    return fed.cli("bundle", "export", "--store", store, "--key", fed.key(who), "--out", out)


def _import(fed, bundle, store, code=0, pinned=True):
    extra = ["--coordinator", fed.pub("coordinator")] if pinned else []
    return fed.cli("bundle", "import", bundle, "--store", store, *extra, code=code)


@pytest.mark.slow
def test_air_gapped_rounds_through_bundles(fed, tmp_path, moto_s3, monkeypatch):
    """Banks keep their own mirror stores (bank-a's on S3); only bundle files cross."""
    mirrors = {b: str(tmp_path / f"mirror-{b}") for b in BANKS[:3]}
    mirrors["bank-a"] = use_s3(moto_s3, monkeypatch)
    for r in (1, 2):
        out = tmp_path / f"global-{r - 1}.bundle"
        res = _export(fed, fed.store, "coordinator", out)
        assert "exported" in res.output and "federation.toml" in res.output
        for b, mirror in mirrors.items():
            res = _import(fed, out, mirror)
            assert "signed by coordinator" in res.output
            assert rounds.latest_round(open_store(mirror)) == r - 1
            res = fed.cli(
                "train",
                "--store",
                mirror,
                "--key",
                fed.key(b),
                "--data",
                fed.data / f"{b}.csv",
                "--coordinator",
                fed.pub("coordinator"),
            )
            assert f"submitted update for round {r}" in res.output
            upd = tmp_path / f"{b}-{r}.bundle"
            _export(fed, mirror, b, upd)
            res = _import(fed, upd, fed.store, pinned=False)
            assert f"rounds/{r:06d}/updates/{b}.json" in res.output and "imported" in res.output
        assert f"published global model of round {r}" in fed.aggregate().output
    # bank-a's mirror follows the chain: its state file has seen round 1, and round 2 imports cleanly
    last = tmp_path / "global-2.bundle"
    _export(fed, fed.store, "coordinator", last)
    _import(fed, last, mirrors["bank-a"])
    assert rounds.latest_round(open_store(mirrors["bank-a"])) == 2
    res = fed.cli(
        "train",
        "--store",
        mirrors["bank-a"],
        "--key",
        fed.key("bank-a"),
        "--data",
        fed.data / "bank-a.csv",
        "--coordinator",
        fed.pub("coordinator"),
    )
    assert "submitted update for round 3" in res.output


def test_import_is_idempotent(fed, tmp_path):
    out = tmp_path / "g.bundle"
    _export(fed, fed.store, "coordinator", out)
    mirror = tmp_path / "mirror"
    first = _import(fed, out, mirror)
    before = {p.relative_to(mirror): p.read_bytes() for p in mirror.rglob("*") if p.is_file()}
    again = _import(fed, out, mirror)
    assert again.output.count("already there") == len(before) and "imported" not in again.output
    assert "imported" in first.output
    after = {p.relative_to(mirror): p.read_bytes() for p in mirror.rglob("*") if p.is_file()}
    assert after == before


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _rewrite(path, change):
    entries = [(n, change(n, d)) for n, d in _members(path)]
    _write_tar(path, entries)


def test_tampered_bundle_is_refused_and_nothing_written(fed, tmp_path):
    out = tmp_path / "g.bundle"
    _export(fed, fed.store, "coordinator", out)
    key = "files/" + rounds.global_keys(0)[0]
    _rewrite(out, lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == key else d)
    mirror = tmp_path / "mirror"
    res = _import(fed, out, mirror, code=ExitCode.VERIFY)
    assert "does not match its sha256" in res.output
    assert not mirror.exists() or not any(mirror.rglob("*.json"))

    _export(fed, fed.store, "coordinator", out)
    _rewrite(out, lambda n, d: d.replace(b'"role":"coordinator"', b'"role":"coordinatoR"') if n == "bundle.json" else d)
    res = _import(fed, out, mirror, code=ExitCode.VERIFY)
    assert "signature does not verify" in res.output


def test_half_copied_bundle_is_refused(fed, tmp_path):
    out = tmp_path / "g.bundle"
    _export(fed, fed.store, "coordinator", out)
    out.write_bytes(out.read_bytes()[:3000])
    res = _import(fed, out, tmp_path / "mirror", code=ExitCode.VERIFY)
    assert "not a readable bundle" in res.output or "differ from the signed index" in res.output


def _forge(fed, path, signer, files, role="member"):
    """A bundle signed by `signer` carrying arbitrary store keys."""
    private, _ = keys.load_private(fed.key(signer))
    index = {
        "kind": "bundle",
        "format": 1,
        "federation_id": "credit-demo",
        "signer": signer,
        "role": role,
        "created_at": rounds.now(),
        "files": [
            {"key": k, "size": len(v), "sha256": __import__("hashlib").sha256(v).hexdigest()} for k, v in files.items()
        ],
    }
    body = keys.canonical(index)
    _write_tar(
        path,
        [("bundle.json", body), ("bundle.sig", keys.sign_bytes(private, body, BUNDLE_DOMAIN).encode())]
        + [(f"files/{k}", v) for k, v in files.items()],
    )


def test_a_bank_cannot_write_what_is_not_its_own(fed, tmp_path):
    fed.train("bank-a")
    store = open_store(fed.loc)
    tkey, mkey = rounds.update_keys(1, "bank-a")
    stolen = {
        rounds.update_keys(1, "bank-b")[0]: store.get(tkey, max_bytes=1 << 30),
        rounds.update_keys(1, "bank-b")[1]: store.get(mkey, max_bytes=1 << 30),
    }
    bad = tmp_path / "b.bundle"
    _forge(fed, bad, "bank-a", stolen)
    res = _import(fed, bad, fed.store, code=ExitCode.VERIFY, pinned=False)
    assert "bank-a may not write rounds/000001/updates/bank-b" in res.output
    _forge(fed, bad, "bank-a", {"rounds/000001/global.json": b"{}"})
    res = _import(fed, bad, fed.store, code=ExitCode.VERIFY, pinned=False)
    assert "may not write rounds/000001/global.json" in res.output
    assert not store.exists(rounds.update_keys(1, "bank-b")[1]) and not store.exists("rounds/000001/global.json")


def test_unknown_signer_and_wrong_pinned_coordinator(fed, tmp_path):
    fed.cli("keygen", "mallory", "--out", fed.root / "mallory")
    bad = tmp_path / "m.bundle"
    _forge(fed, bad, "mallory", {rounds.update_keys(1, "mallory")[1]: b"{}"})
    res = _import(fed, bad, fed.store, code=ExitCode.VERIFY, pinned=False)
    assert "not in federation" in res.output
    out = tmp_path / "g.bundle"
    _export(fed, fed.store, "coordinator", out)
    res = fed.cli(
        "bundle",
        "import",
        out,
        "--store",
        tmp_path / "mirror",
        "--coordinator",
        fed.pub("mallory"),
        code=ExitCode.VERIFY,
    )
    assert "does not verify with the pinned coordinator key" in res.output
    res = _import(fed, out, tmp_path / "mirror", code=1, pinned=False)
    assert "pass --coordinator" in res.output


def test_conflicting_file_is_never_overwritten(fed, tmp_path):
    fed.train("bank-a")
    upd = tmp_path / "a.bundle"
    _export(fed, fed.store, "bank-a", upd)
    other = make_fed(tmp_path / "other", fed.root / "data", spec_text=(fed.root / "federation.toml").read_text())
    # same federation id and keys are different: the signer check refuses first
    res = _import(fed, upd, other.store, code=ExitCode.VERIFY, pinned=False)
    assert "signature does not verify" in res.output or "not in federation" in res.output
    # same store, a different manifest already committed for bank-a: refused, nothing written
    store = open_store(fed.loc)
    mkey = rounds.update_keys(1, "bank-a")[1]
    committed = store.get(mkey, max_bytes=1 << 30)
    doc = json.loads(committed)
    doc["nonce"] = "ff" * 16
    store.delete(mkey)
    private, _ = keys.load_private(fed.key("bank-a"))
    doc.pop("signature")
    store.put(mkey, keys.sign_manifest(private, doc))
    res = _import(fed, upd, fed.store, code=ExitCode.VERIFY, pinned=False)
    assert "already holds a different" in res.output
    assert store.get(mkey, max_bytes=1 << 30) != committed


def test_symlinks_and_stray_members_are_refused(fed, tmp_path):
    out = tmp_path / "g.bundle"
    _export(fed, fed.store, "coordinator", out)
    with tarfile.open(out, "a") as tar:
        info = tarfile.TarInfo("files/evil")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    res = _import(fed, out, tmp_path / "mirror", code=ExitCode.VERIFY)
    assert "not a regular file" in res.output
    _export(fed, fed.store, "coordinator", out)
    with tarfile.open(out, "a") as tar:
        info = tarfile.TarInfo("../outside")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    res = _import(fed, out, tmp_path / "mirror", code=ExitCode.VERIFY)
    assert "unexpected or repeated member" in res.output
    assert not (tmp_path / "outside").exists()


def test_export_needs_something_to_send(fed, tmp_path):
    res = fed.cli(
        "bundle", "export", "--store", fed.store, "--key", fed.key("bank-a"), "--out", tmp_path / "a.bundle", code=1
    )
    assert "no committed update for round 1" in res.output and not (tmp_path / "a.bundle").exists()
    fed.cli("keygen", "stranger", "--out", tmp_path / "s")
    res = fed.cli(
        "bundle",
        "export",
        "--store",
        fed.store,
        "--key",
        tmp_path / "s" / "stranger.key",
        "--out",
        tmp_path / "s.bundle",
        code=1,
    )
    assert "neither the coordinator nor a member" in res.output


def test_member_larger_than_its_signed_size_is_refused_before_reading(fed, tmp_path):
    """Sizes are checked against the signed index from the tar headers, before any content is loaded."""
    fed.train("bank-a")
    out = tmp_path / "a.bundle"
    _export(fed, fed.store, "bank-a", out)
    key = "files/" + rounds.update_keys(1, "bank-a")[0]
    _rewrite(out, lambda n, d: d + b"\0" * 4096 if n == key else d)
    res = _import(fed, out, fed.store, code=ExitCode.VERIFY, pinned=False)
    assert "does not match its size in the signed index" in res.output
