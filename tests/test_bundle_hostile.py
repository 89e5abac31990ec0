"""Bundles against an attacker: links planted in the store, hostile tar members, forged indexes.

Each case ends in one line and exit 4 (or a warning for an optional file), with nothing
written to the destination store and no private bytes in any bundle. Forged indexes are
re-signed with a genuine key, so only the contract (not the signature) can catch them.
"""

import hashlib
import io
import os
import tarfile

import pytest
from helpers import make_fed

from fedcli import keys
from fedcli.errors import ExitCode
from fedcli.protocol import rounds
from fedcli.store.bundle import BUNDLE_DOMAIN

TENSORS = rounds.global_keys(0)[0]


@pytest.fixture(scope="module")
def fed(tmp_path_factory, credit_split):
    """One federation whose store these tests only read (tests that plant files make their own)."""
    return make_fed(tmp_path_factory.mktemp("hostile"), credit_split)


@pytest.fixture(scope="module")
def genuine(fed):
    """The coordinator's real bundle, as {member name: bytes}."""
    out = fed.root / "genuine.bundle"
    fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out)
    with tarfile.open(out) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _import(fed, bundle, mirror, code=ExitCode.VERIFY):
    res = fed.cli("bundle", "import", bundle, "--store", mirror, "--coordinator", fed.pub("coordinator"), code=code)
    if code != 0:
        assert len(res.output.strip().splitlines()) == 1, res.output  # one line, never a traceback
        assert not mirror.exists() or not [p for p in mirror.rglob("*") if p.is_file()], "something was written"
    return res


def _header(name, size=0, kind=tarfile.REGTYPE, fmt=tarfile.GNU_FORMAT, **extra):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode, info.mtime = size, kind, 0o644, 0
    for k, v in extra.items():
        setattr(info, k, v)
    return info.tobuf(fmt)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _raw_tar(path, parts):
    """Write a tar from (header bytes, data bytes | hole size) parts; holes are seeked over (sparse: no disk)."""
    with open(path, "wb") as f:
        for header, data in parts:
            f.write(header)
            if isinstance(data, int):
                f.seek(data + (-data % 512), io.SEEK_CUR)
            else:
                f.write(_pad(data))
        f.write(b"\0" * 1024)
        f.truncate()


def _signed_index(fed, signer, files, change=None, role="coordinator"):
    """bundle.json and bundle.sig, signed with signer's genuine key; change() may tamper with the index first."""
    index = {
        "kind": "bundle",
        "format": 1,
        "federation_id": "credit-demo",
        "signer": signer,
        "role": role,
        "created_at": rounds.now(),
        "files": [
            {
                "key": k,
                "size": len(v) if isinstance(v, bytes) else v,
                "sha256": hashlib.sha256(v if isinstance(v, bytes) else b"").hexdigest(),
            }
            for k, v in files.items()
        ],
    }
    body = keys.canonical(change(index) if change else index) if not isinstance(change, bytes) else change
    private, _ = keys.load_private(fed.key(signer))
    return body, keys.sign_bytes(private, body, BUNDLE_DOMAIN).encode()


def _bundle(fed, path, files, change=None, signer="coordinator", role="coordinator", members=None):
    """A bundle of `files` ({key: bytes or hole size}) with a genuinely signed index."""
    body, sig = _signed_index(fed, signer, files, change, role)
    parts = [(_header("bundle.json", len(body)), body), (_header("bundle.sig", len(sig)), sig)]
    for k, v in files.items():
        parts.append((_header(f"files/{k}", v if isinstance(v, int) else len(v)), v))
    _raw_tar(path, parts + (members or []))


def _names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


def _files(genuine):
    return {n[len("files/") :]: d for n, d in genuine.items() if n.startswith("files/")}


# -- export: only what verifies leaves the store ---------------------------------------------


def test_rejections_link_to_the_coordinator_key_never_enters_a_bundle(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    planted = fed.store / rounds.rejections_key(0)
    planted.symlink_to(fed.key("coordinator"))
    pem = fed.key("coordinator").read_bytes()
    out = tmp_path / "g.bundle"
    res = fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out)
    assert "warning:" in res.output and "rejections.json not packed" in res.output
    data = out.read_bytes()
    assert pem not in data and b"PRIVATE KEY" not in data
    assert f"files/{rounds.rejections_key(0)}" not in _names(out)
    # the bundle is still whole and imports cleanly
    fed.cli("bundle", "import", out, "--store", tmp_path / "mirror", "--coordinator", fed.pub("coordinator"))

    # an unsigned (forged) rejections list is left out too; a coordinator-signed one is carried
    planted.unlink()
    planted.write_bytes(keys.canonical({"bank-b": "forged reason"}))
    res = fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out)
    assert "rejections.json not packed" in res.output and b"forged reason" not in out.read_bytes()
    private, _ = keys.load_private(fed.key("coordinator"))
    planted.write_bytes(keys.sign_manifest(private, {"kind": "global", "round": 0, "federation_id": "credit-demo"}))
    res = fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out)
    assert "manifest kind is 'global', expected 'rejections'" in res.output  # signed, but not a rejections list
    planted.write_bytes(
        keys.sign_manifest(
            private,
            {
                "kind": "rejections",
                "format": 1,
                "federation_id": "credit-demo",
                "round": 0,
                "created_at": rounds.now(),
                "rejected": {},
            },
        )
    )
    res = fed.cli("bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out)
    assert "warning:" not in res.output and f"files/{rounds.rejections_key(0)}" in _names(out)


def test_links_and_forgeries_at_a_bank_update_are_not_packed(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    fed.train("bank-a")
    tkey, mkey = rounds.update_keys(1, "bank-a")
    csv = (fed.data / "bank-a.csv").resolve()
    tensors = fed.store / tkey
    tensors.unlink()
    tensors.symlink_to(csv)
    out = tmp_path / "a.bundle"
    res = fed.cli(
        "bundle", "export", "--store", fed.store, "--key", fed.key("bank-a"), "--out", out, code=ExitCode.VERIFY
    )
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    assert not list(tmp_path.glob(".bundle-*"))  # no half-written temp file either

    # a garbage manifest planted in the bank's name does not verify: nothing is exported
    tensors.unlink()
    (fed.store / mkey).write_bytes(b'{"kind": "update", "signature": "AAAA"}')
    res = fed.cli(
        "bundle", "export", "--store", fed.store, "--key", fed.key("bank-a"), "--out", out, code=ExitCode.VERIFY
    )
    assert "signature does not verify" in res.output and not out.exists()


def test_global_tensors_that_do_not_match_their_manifest_are_not_packed(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    path = fed.store / TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    out = tmp_path / "g.bundle"
    res = fed.cli(
        "bundle", "export", "--store", fed.store, "--key", fed.key("coordinator"), "--out", out, code=ExitCode.VERIFY
    )
    assert "does not match the sha256 in its signed manifest" in res.output and not out.exists()


# -- import: hostile tar members, refused before they are read --------------------------------


def test_gnu_sparse_member_is_refused(fed, genuine, tmp_path):
    files = _files(genuine)
    body, sig = genuine["bundle.json"], genuine["bundle.sig"]
    sparse = bytearray(_header(f"files/{TENSORS}", 0, tarfile.GNUTYPE_SPARSE))
    sparse[483:495] = b"%011o\0" % (64 << 20)  # realsize: 64 MiB of holes
    sparse[148:156] = b" " * 8
    sparse[148:156] = b"%06o\0 " % sum(sparse)
    parts = [(_header("bundle.json", len(body)), body), (_header("bundle.sig", len(sig)), sig), (bytes(sparse), b"")]
    parts += [(_header(f"files/{k}", len(v)), v) for k, v in files.items() if k != TENSORS]
    bad = tmp_path / "sparse.bundle"
    _raw_tar(bad, parts)
    res = _import(fed, bad, tmp_path / "mirror")
    assert "not a regular file" in res.output or "sparse" in res.output

    # the pax flavour of a sparse file (GNU.sparse.* records) is refused the same way
    bad2 = tmp_path / "pax-sparse.bundle"
    pax = _header(
        f"files/{TENSORS}",
        0,
        fmt=tarfile.PAX_FORMAT,
        pax_headers={"GNU.sparse.map": "0,0", "GNU.sparse.realsize": str(64 << 20)},
    )
    _raw_tar(bad2, parts[:2] + [(pax, b"")])
    res = _import(fed, bad2, tmp_path / "mirror")
    assert "sparse member" in res.output


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE]
)
def test_special_members_are_refused(fed, genuine, tmp_path, kind):
    files = _files(genuine)
    bad = tmp_path / "special.bundle"
    _bundle(
        fed,
        bad,
        files,
        members=[
            (_header("files/rounds/000000/rejections.json", 0, kind, linkname="../../coordinator/coordinator.key"), b"")
        ],
    )
    res = _import(fed, bad, tmp_path / "mirror")
    assert "is not a regular file; refused" in res.output


def test_a_member_of_one_and_a_half_gib_is_refused_without_reading_it(fed, genuine, tmp_path):
    """A sparse 1.5 GiB file on disk (no disk used); the genuine coordinator signs its claimed size."""
    huge = 3 << 29
    files = {**_files(genuine), TENSORS: huge}
    bad = tmp_path / "huge.bundle"
    _bundle(fed, bad, files)
    assert bad.stat().st_size > huge and bad.stat().st_blocks * 512 < 64 << 20
    res = _import(fed, bad, tmp_path / "mirror")
    assert "its kind allows; not read" in res.output and ExitCode.VERIFY == 4

    # same archive, but the signed index claims the genuine size: the header disagrees, refused before reading
    real = _files(genuine)
    bad2 = tmp_path / "huge2.bundle"
    body, sig = genuine["bundle.json"], genuine["bundle.sig"]
    parts = [(_header("bundle.json", len(body)), body), (_header("bundle.sig", len(sig)), sig)]
    parts += [
        (_header(f"files/{k}", huge if k == TENSORS else len(v)), huge if k == TENSORS else v) for k, v in real.items()
    ]
    _raw_tar(bad2, parts)
    res = _import(fed, bad2, tmp_path / "mirror")
    assert "does not match its size in the signed index" in res.output


def test_a_huge_pax_header_is_not_read(fed, genuine, tmp_path):
    """tarfile reads pax records whole: a header claiming 1.5 GiB must be refused, not loaded."""
    bad = tmp_path / "pax.bundle"
    _raw_tar(bad, [(_header("././@PaxHeader", 3 << 29, tarfile.XHDTYPE), 3 << 29)])
    res = _import(fed, bad, tmp_path / "mirror")
    assert "pax.bundle: a tar header is larger than any bundle needs" in res.output


def test_a_bundle_carries_one_tensor_file_and_documents_within_their_kind(fed, genuine, tmp_path):
    files = _files(genuine)
    two = {**files, "rounds/000001/global.safetensors": files[TENSORS]}
    bad = tmp_path / "two.bundle"
    _bundle(fed, bad, two)
    res = _import(fed, bad, tmp_path / "mirror")
    assert "more than 1 tensor file" in res.output
    big = {**files, "rounds/000000/rejections.json": b" " * (65 * 1024)}
    _bundle(fed, bad, big)
    res = _import(fed, bad, tmp_path / "mirror")
    assert "rejections.json is 66,560 bytes" in res.output and "its kind allows" in res.output


def test_a_bundle_path_that_is_not_a_file(fed, tmp_path):
    fifo = tmp_path / "fifo.bundle"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, "/dev/zero"):
        res = _import(fed, path, tmp_path / "mirror", code=ExitCode.ERROR)
        assert "is not a regular file" in res.output


def test_truncated_and_garbage_archives(fed, genuine, tmp_path):
    bad = tmp_path / "junk.bundle"
    for blob in (b"", b"\0" * 512, b"not a tar at all" * 64, _header("bundle.json", 10**11)[:512]):
        bad.write_bytes(blob)
        res = _import(fed, bad, tmp_path / "mirror")
        assert "bundle" in res.output


# -- import: the index contract, behind a genuine signature ------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {**i, "filez": i.pop("files")}, "unknown key 'filez'; did you mean 'files'?"),
        (lambda i: {**i, "note": "hi"}, "unknown key 'note'"),
        (lambda i: {**i, "format": 2}, "'format'"),
        (lambda i: {**i, "format": True}, "'format'"),
        (lambda i: {**i, "kind": "bundel"}, "'kind'"),
        (lambda i: {**i, "role": "member"}, "role 'member'"),
        (lambda i: {**i, "created_at": "yesterday"}, "'created_at'"),
        (lambda i: {**i, "files": [{**f, "size": str(f["size"])} for f in i["files"]]}, "'files[0].size'"),
        (lambda i: {**i, "files": [{**f, "size": -1} for f in i["files"]]}, "'files[0].size'"),
        (lambda i: {**i, "files": [{**f, "sha256": "XYZ"} for f in i["files"]]}, "'files[0].sha256'"),
        (lambda i: {**i, "files": [{**f, "key": "../../etc/passwd"} for f in i["files"]][:1]}, "invalid store path"),
        (lambda i: {**i, "files": i["files"] + i["files"][:1]}, "lists a file twice"),
        (lambda i: {**i, "files": [{**f, "extra": 1} for f in i["files"]]}, "unknown key 'files[0].extra'"),
        (lambda i: {**i, "federation_id": "Credit Demo"}, "'federation_id'"),
        (lambda i: [i], "bundle index names no signer"),
        (b'{"signer": "coordinator", "files": ' + b"[" * 3000 + b"]" * 3000 + b"}", "levels deep"),
        (b'{"signer": "coordinator", "size": NaN}', "not valid JSON"),
    ],
)
def test_index_contract_behind_a_genuine_signature(fed, genuine, tmp_path, change, message):
    bad = tmp_path / "forged.bundle"
    _bundle(fed, bad, _files(genuine), change)
    res = _import(fed, bad, tmp_path / "mirror")
    assert message in res.output


def test_a_bank_cannot_claim_the_coordinator_role(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    fed.train("bank-a")
    tkey, mkey = rounds.update_keys(1, "bank-a")
    files = {k: (fed.store / k).read_bytes() for k in (tkey, mkey)}
    bad = tmp_path / "role.bundle"
    _bundle(fed, bad, files, signer="bank-a", role="coordinator")
    before = sorted(p for p in fed.store.rglob("*"))
    res = fed.cli("bundle", "import", bad, "--store", fed.store, code=ExitCode.VERIFY)
    assert "role 'coordinator' but bank-a is the member" in res.output
    assert sorted(p for p in fed.store.rglob("*")) == before
