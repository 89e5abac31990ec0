"""Property-based fuzzing of every reader of untrusted bytes (hypothesis).

The property, for each reader: on any input the call either returns or raises a
fedcli.errors.FedcliError (one line, an exit code), never another exception, and it stays
within a time and memory bound. Inputs are random bytes, TOML/JSON-ish text, and mutations
of genuine documents (byte flips, splices, deep nesting, huge numbers, re-signed edits) so
the checks behind a valid signature are reached too.

The examples per target are bounded so the file runs in about a minute on CI;
bench/fuzz.py runs the same targets for as long as you ask (see docs/benchmarks.md).
"""

from __future__ import annotations

import io
import json
import resource
import shutil
import struct
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import TEMPLATE_PATH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcli import digest, keys
from fedcli.errors import FedcliError
from fedcli.protocol import rounds, tensors
from fedcli.protocol.spec import loads as load_spec

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # big reprs of nested inputs
TIME_LIMIT = 5.0  # seconds one call may take (generous for a loaded 2-core CI box)
MEMORY_LIMIT = 512 << 20  # peak RSS may grow by at most this over the whole run
EXAMPLES = 400  # per target in CI; bench/fuzz.py runs for minutes instead

# Tokens that make parsers work hard: nesting, huge or non-finite numbers, quotes, nulls.
INTERESTING = [
    b"[" * 3000,
    b"{" * 3000,
    b'{"a":' * 2000,
    b"[[" * 20,
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"-1",
    b"0",
    b"18446744073709551615",
    b"9" * 400,
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x00" * 8,
    b'"',
    b"\\",
    b"\\u0000",
    b"\xc3\x28",
    b"true",
    b"null",
    b'"__metadata__"',
    b"=",
    b"[[x]]",
    b"inf",
    b"nan",
    b'"""',
    b"'''",
    b"\n[a]\n",
    b"0x7fffffffffffffff",
    b"1979-05-27T07:32:00Z",
]


# -- shared machinery (bench/fuzz.py imports it) ----------------------------------------------


@dataclass
class World:
    """Genuine documents to mutate: a federation initialised through the real CLI."""

    root: Path
    spec_bytes: bytes
    spec: object
    manifest_doc: dict  # a bank's update manifest, unsigned
    bank_key: object
    bank_pub: object
    shapes: dict
    tensors: bytes  # the genuine round-0 global model (safetensors)
    bundle: bytes  # the coordinator's genuine bundle
    coordinator_key: object
    coordinator_pub_path: Path
    update_store: object  # a folder store holding the spec, round 0 and room for bank-a's update


def build_world(root: Path) -> World:
    from typer.testing import CliRunner

    from fedcli import models
    from fedcli.cli import app
    from fedcli.store import open_store

    runner = CliRunner()

    def cli(*args):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res

    for name in ("coordinator", "bank-a", "bank-b", "bank-c"):
        cli("keygen", name, "--out", root / "keys")
    store = root / "store"
    cli(
        "init",
        store,
        "--spec",
        TEMPLATE_PATH,
        "--key",
        root / "keys" / "coordinator.key",
        *[x for b in ("bank-a", "bank-b", "bank-c") for x in ("--member", root / "keys" / f"{b}.pub")],
    )
    cli("bundle", "export", "--store", store, "--key", root / "keys" / "coordinator.key", "--out", root / "g.bundle")
    spec_bytes = (store / rounds.SPEC_KEY).read_bytes()
    spec = load_spec(spec_bytes)
    shapes = models.shapes(spec.model, spec.data.n_features)
    global_bytes = (store / rounds.global_keys(0)[0]).read_bytes()
    base = json.loads((store / rounds.global_keys(0)[1]).read_bytes())
    bank_key, _ = keys.load_private(root / "keys" / "bank-a.key")
    coord_key, _ = keys.load_private(root / "keys" / "coordinator.key")
    delta = tensors.encode({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    update_store = open_store(str(store))
    update_store.put(rounds.update_keys(1, "bank-a")[0], delta)
    manifest = {
        "kind": "update",
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": 1,
        "member": "bank-a",
        "base_sha256": base["tensors_sha256"],
        "tensors_sha256": digest.sha256(delta),
        "num_examples": 100,
        "compression": {"method": "none"},
        "metrics": {"auc": 0.7, "loss": 0.5},
        "created_at": rounds.now(),
        "nonce": "ab" * 16,
    }
    global BASELINE_RSS
    BASELINE_RSS = _peak_rss()  # after init imported torch: what the readers add is what counts
    return World(
        root,
        spec_bytes,
        spec,
        manifest,
        bank_key,
        spec.member("bank-a"),
        shapes,
        global_bytes,
        (root / "g.bundle").read_bytes(),
        coord_key,
        root / "keys" / "coordinator.pub",
        update_store,
    )


def within_bounds(call):
    """Run call; only a FedcliError may escape; it must finish in TIME_LIMIT and not balloon memory."""
    start = time.perf_counter()
    try:
        call()
    except FedcliError as e:  # one line: no newline or terminal control character from the input
        text = str(e)
        assert text and not any(ord(c) < 32 or ord(c) == 127 for c in text), f"not one clean line: {e!r}"
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT, f"took {elapsed:.1f} s"
    grown = _peak_rss() - BASELINE_RSS
    assert grown < MEMORY_LIMIT, f"peak RSS grew by {grown >> 20} MiB"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BASELINE_RSS = _peak_rss()


@st.composite
def mutated(draw, seed: bytes, max_ops: int = 6) -> bytes:
    """seed after a few byte-level edits: flips, overwrites, inserts, deletes, duplications, hostile tokens."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "dup", "token", "truncate")))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 512))]
        elif op == "token":
            token = draw(st.sampled_from(INTERESTING))
            data[pos : pos + draw(st.integers(0, len(token)))] = token
        else:
            del data[pos:]
    return bytes(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def edited(draw, doc: dict) -> dict:
    """doc with a few fields replaced, removed or added (values of any JSON type)."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("replace", "remove", "add")))
        if op == "add" or not doc:
            doc[draw(st.text(max_size=12))] = draw(json_values)
            continue
        key = draw(st.sampled_from(sorted(doc)))
        if op == "remove":
            del doc[key]
        else:
            doc[key] = draw(json_values | st.sampled_from([2**63, -(2**63) - 1, 10**300, 0, -1, "", True]))
    return doc


# -- the targets --------------------------------------------------------------------------------


def spec_inputs(world: World):
    toml_text = st.text(alphabet=st.sampled_from(list("[]{}=\"'.,#\n \t-_:0123456789abcdefxyz")), max_size=400)
    return st.one_of(st.binary(max_size=2048), toml_text.map(str.encode), mutated(world.spec_bytes))


def check_spec(world: World, data: bytes) -> None:
    within_bounds(lambda: load_spec(data))


def manifest_inputs(world: World):
    signed = keys.sign_manifest(world.bank_key, world.manifest_doc)
    resigned = edited(world.manifest_doc).map(lambda d: _sign(world.bank_key, d))
    return st.one_of(
        st.binary(max_size=1024), mutated(signed), resigned, json_values.map(lambda v: json.dumps(v).encode())
    )


def _sign(key, doc) -> bytes:
    try:
        return keys.sign_manifest(key, doc)
    except ValueError:  # a "signature" key added by the edit: sign_manifest refuses it, as it should
        return keys.canonical(doc)


def check_manifest(world: World, data: bytes) -> None:
    """verify_manifest, then the full update check (typed manifest, bounds) as the coordinator runs it."""

    def call():
        keys.verify_manifest(data, world.bank_pub, "update from bank-a")
        world.update_store.put(rounds.update_keys(1, "bank-a")[1], data)
        base = json.loads((world.root / "store" / rounds.global_keys(0)[1]).read_bytes())["tensors_sha256"]
        rounds.verify_update(world.update_store, world.spec, 1, "bank-a", base, world.shapes)

    within_bounds(call)


def tensor_inputs(world: World):
    header_len = struct.unpack("<Q", world.tensors[:8])[0]
    header = json.loads(world.tensors[8 : 8 + header_len])
    body = world.tensors[8 + header_len :]

    def with_header(h) -> bytes:
        raw = h if isinstance(h, bytes) else json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    info = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "F64", "I8", "U32", "BF16", "", 7]),
            "shape": st.lists(st.integers(-2, 2**64), max_size=4) | json_values,
            "data_offsets": st.lists(st.integers(-2, 2**64), max_size=3) | json_values,
        },
    )
    headers = st.dictionaries(st.sampled_from(sorted(header) + ["x", "__metadata__"]), info | json_values, max_size=5)
    length_lies = st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + world.tensors[8:])
    return st.one_of(
        st.binary(max_size=512),
        mutated(world.tensors),
        headers.map(with_header),
        edited(header).map(with_header),
        length_lies,
        st.sampled_from(INTERESTING).map(lambda t: with_header(t * 3)),
    )


def check_tensors(world: World, data: bytes) -> None:
    within_bounds(lambda: tensors.decode(data, world.shapes, "global model"))


def _tar_members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


@st.composite
def bundle_edits(draw, world: World) -> bytes:
    """A genuine bundle whose members, headers or index (re-signed by the coordinator) were edited."""
    members = _tar_members(world.bundle)
    genuine_index = members[0][1]
    out = io.BytesIO()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(members) - 1))
        info, data = members[i]
        info = tarfile.TarInfo(info.name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        op = draw(st.sampled_from(("type", "size", "name", "pax", "drop", "dup", "content", "index")))
        if op == "type":
            info.type = draw(
                st.sampled_from(
                    [
                        tarfile.SYMTYPE,
                        tarfile.LNKTYPE,
                        tarfile.DIRTYPE,
                        tarfile.FIFOTYPE,
                        tarfile.CHRTYPE,
                        tarfile.GNUTYPE_SPARSE,
                        tarfile.CONTTYPE,
                        b"Z",
                    ]
                )
            )
            info.linkname = draw(st.sampled_from(["", "/etc/passwd", "../../coordinator.key"]))
        elif op == "size":
            info.size = draw(st.integers(0, 2**40))
        elif op == "name":
            info.name = draw(
                st.sampled_from(["bundle.json", "files/../x", "/abs", "files/", "a" * 300, "files/x"])
                | st.text(max_size=40)
            )
        elif op == "pax":
            info.pax_headers = draw(
                st.dictionaries(
                    st.sampled_from(
                        [
                            "GNU.sparse.map",
                            "GNU.sparse.realsize",
                            "GNU.sparse.size",
                            "GNU.sparse.major",
                            "GNU.sparse.minor",
                            "size",
                            "path",
                            "linkpath",
                        ]
                    ),
                    st.sampled_from(["0,0", "1", "0", str(2**40), "-1", "x", "1,2,3"]) | st.text(max_size=12),
                    min_size=1,
                    max_size=3,
                )
            )
        elif op == "drop":
            members.pop(i)
            continue
        elif op == "dup":
            members.append((info, data))
        elif op == "content":
            data = draw(mutated(data, 3))
        else:
            if draw(st.booleans()):
                body = keys.canonical(draw(edited(json.loads(genuine_index))))
            else:
                body = draw(mutated(genuine_index, 3))
            sig = keys.sign_bytes(world.coordinator_key, body, b"fedcli-bundle-v1\n").encode()
            members[0] = (tarfile.TarInfo("bundle.json"), body)
            members[0][0].size = len(body)
            info, data, i = tarfile.TarInfo("bundle.sig"), sig, 1
            info.size = len(sig)
        members[i] = (info, data)
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    for info, data in members:
        try:
            out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        except (ValueError, UnicodeError):  # tarfile cannot even write this header: skip the member
            continue
        out.write(data[: info.size] + b"\0" * (-min(len(data), info.size) % 512))
    out.write(b"\0" * 1024)
    return out.getvalue()


def bundle_inputs(world: World):
    return st.one_of(bundle_edits(world), mutated(world.bundle), st.binary(max_size=2048))


def check_bundle(world: World, data: bytes) -> None:
    """Import into an empty mirror (the spec comes from the bundle) and into the coordinator's own store."""
    from fedcli.store import open_store
    from fedcli.store.bundle import import_bundle

    tmp = Path(tempfile.mkdtemp(dir=world.root))
    try:
        path = tmp / "in.bundle"
        path.write_bytes(data)
        within_bounds(lambda: import_bundle(open_store(str(tmp / "mirror")), path, world.coordinator_pub_path))
        within_bounds(lambda: import_bundle(open_store(str(world.root / "store")), path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TARGETS = {  # name -> (inputs strategy, check); bench/fuzz.py runs the same table
    "spec": (spec_inputs, check_spec),
    "manifest": (manifest_inputs, check_manifest),
    "safetensors": (tensor_inputs, check_tensors),
    "bundle": (bundle_inputs, check_bundle),
}


# -- pytest -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reader_fails_only_with_fedcli_errors(world, target):
    inputs, check = TARGETS[target]

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(inputs(world))
    def run(data):
        check(world, data)

    run()


def test_the_genuine_documents_pass(world):
    """The seeds themselves are accepted, so the mutations start from inputs that reach deep checks."""
    load_spec(world.spec_bytes)
    tensors.decode(world.tensors, world.shapes, "global model")
    assert keys.verify_manifest(keys.sign_manifest(world.bank_key, world.manifest_doc), world.bank_pub, "m")
    mirror = world.root / "seed-mirror"
    path = world.root / "seed.bundle"
    path.write_bytes(world.bundle)
    from fedcli.store import open_store
    from fedcli.store.bundle import import_bundle

    assert import_bundle(open_store(str(mirror)), path, world.coordinator_pub_path).written
