"""Air-gap bundles: one signed archive carries the files that must cross between two stores.

Out (coordinator -> banks, signed by the key the newest spec version names): the signed spec and
its later versions (specs/: protocol/chain.py, pending ones too, so banks can countersign), the
statistics document (protocol/statistics.py), every global manifest and rejections list, the
latest global tensors (and, with secure aggregation, the open round's drop declaration and the
survivors' signed update manifests, whose sealed self-mask shares each survivor must open), and
the final marker (protocol/final.py).
In (bank -> coordinator): only files that bank signed: its committed update for the open round
(and its recovery shares once it published them), its holdout evaluations
(protocol/evaluations.py), its statistics contribution, its key rotation statements and
countersignatures. The archive is a plain tar holding

    bundle.json      canonical JSON index (BundleIndex): kind, federation, signer, every file's key, size, sha256
    bundle.sig       Ed25519 signature of the signer over "fedcli-bundle-v1\\n" + bundle.json
    files/<key>      the files, at their store keys

Export packs only what verifies: the spec's signature over its raw bytes, each manifest's
signature, each tensor file's sha256 against its verified manifest. A file planted in the
store (a link to a private key, a forged list) never verifies, so it never leaves.

Import walks the tar headers first (regular, non-sparse members only, header reads bounded),
reads the spec files the bundle carries (bounded in total) so the chain walk can say who the
coordinator is now, verifies the index signature over the raw bytes, then validates the index
against its contract, checks that each signer only carries its own kind of file and that every
member fits both its signed size and the bound of its kind (tensors by the spec's model), and
only then reads contents, checks each hash and each carried document's signer and place.
It refuses conflicts before writing anything,
then writes like every other writer: tensors first, manifests (create-only) last. Importing
twice is a no-op. Nothing is ever extracted to disk or unpickled.
"""

from __future__ import annotations

import functools
import io
import re
import stat
import tarfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from fedcli import keys
from fedcli.contract import load_json, strict_config, validate
from fedcli.digest import sha256
from fedcli.errors import AlreadyExists, ContractError, FedcliError, InputError, NotFound, Oversize, VerificationError
from fedcli.files import atomic_writer
from fedcli.names import check_key, check_name
from fedcli.protocol import tensors
from fedcli.protocol.rounds import (
    MAX_MANIFEST_BYTES,
    MAX_SIG_BYTES,
    MAX_SPEC_BYTES,
    SPEC_KEY,
    SPEC_SIG_KEY,
    expect,
    global_keys,
    global_rounds,
    load_spec,
    now,
    rejections_key,
    round_dir,
    spec_for_round,
    update_keys,
)
from fedcli.protocol.spec import Spec
from fedcli.store.base import Store as BaseStore

if TYPE_CHECKING:
    from fedcli.store import Store

BUNDLE_DOMAIN = b"fedcli-bundle-v1\n"
FORMAT = 1
MAX_INDEX_BYTES = 1 << 20
MAX_FILES = 10_000
MAX_BUNDLE_BYTES = 4 << 30  # refuse absurd archives before opening them
MAX_HEADER_READ = 1 << 20  # one tar header read (pax record, long name): ours are a few hundred bytes
MAX_HEADER_TOTAL = 64 << 20  # all header reads together: (MAX_FILES + 2) members need far less
MAX_SPEC_FILES_BYTES = 64 << 20  # spec versions, links, countersignatures, statistics: read before the signature
MAX_TENSOR_FILES = 1  # a bundle carries one model's (or one update's) tensors
_INDEX_NAMES = ("bundle.json", "bundle.sig")
_COORD_KEYS = re.compile(
    r"^(federation\.toml(\.sig)?|rounds/\d{6}/(global\.(json|safetensors)|rejections\.json|secagg/drops\.json"
    r"|updates/[^/]+\.json|pairshares/[^/]+\.bin)"
    r"|specs/\d{6}/(federation\.toml|link\.json|countersign/[a-z0-9][a-z0-9_-]{0,62}\.json)"
    r"|statistics/statistics\.json|final\.json)$"
)
# What the spec's verified reading (rounds.load_spec: the chain walk, the statistics document) looks at.
_SPEC_READ = re.compile(
    r"^(federation\.toml(\.sig)?|specs/\d{6}/(federation\.toml|link\.json|countersign/[a-z0-9][a-z0-9_-]{0,62}\.json)"
    r"|statistics/statistics\.json)$"
)
STATISTICS_KEY = "statistics/statistics.json"  # protocol.statistics.STATISTICS_KEY
FINAL_KEY = "final.json"  # protocol.final.FINAL_KEY
_CHAIN_SPEC = re.compile(r"^specs/\d{6}/federation\.toml$")  # spec versions >= 2 (protocol/chain.py)
_SPEC_KEYS = (SPEC_KEY, SPEC_SIG_KEY)


def _member_keys(member: str) -> re.Pattern:
    """A member writes only its own files: update, recovery shares, holdout evaluations, its statistics
    contribution, its key rotation statements and its countersignatures of spec versions."""
    m = re.escape(member)
    return re.compile(
        rf"^(rounds/\d{{6}}/(updates/{m}\.(json|safetensors)|secagg/recovery/{m}\.json|evaluations/{m}\.json"
        rf"|pairshares/{m}\.bin)"
        rf"|statistics/[0-9a-f]{{16}}/{m}\.json|specs/rotations/{m}/[0-9a-f]{{16}}\.json"
        rf"|specs/\d{{6}}/countersign/{m}\.json)$"
    )


# -- the index contract ---------------------------------------------------------------


@functools.cache
def index_model():
    """BundleIndex, the contract of bundle.json; built on first use so `fedcli --help` never imports pydantic."""
    from pydantic import AfterValidator, BaseModel, Field, field_validator

    def plain(check):
        def run(value):
            try:
                return check(value)
            except FedcliError as e:  # our rule, as a pydantic error so it keeps its field path
                raise ValueError(str(e)) from None

        return AfterValidator(run)

    class BundleFile(BaseModel):
        """One carried file: its store key, its exact size and its sha256."""

        model_config = strict_config()
        key: Annotated[str, Field(max_length=512), plain(check_key)]
        size: Annotated[int, Field(ge=0, le=MAX_BUNDLE_BYTES)]
        sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    class BundleIndex(BaseModel):
        """bundle.json: who signed the bundle, for which federation, and every file it carries."""

        model_config = strict_config()
        kind: Literal["bundle"]
        format: Annotated[int, Field(ge=FORMAT, le=FORMAT)]  # strict int: Literal[1] would take True
        federation_id: Annotated[str, plain(lambda v: check_name(v, "federation id"))]
        signer: Annotated[str, plain(lambda v: check_name(v, "signer name"))]
        role: Literal["coordinator", "member"]
        created_at: Annotated[str, Field(max_length=64)]
        files: Annotated[list[BundleFile], Field(max_length=MAX_FILES)]

        @field_validator("created_at")
        @classmethod
        def _iso(cls, value: str) -> str:
            datetime.fromisoformat(value)  # ValueError -> "'created_at' invalid isoformat string"
            return value

        @field_validator("files")
        @classmethod
        def _unique(cls, files: list) -> list:
            if len({f.key for f in files}) != len(files):
                raise ValueError("lists a file twice")
            return files

    return BundleIndex


@dataclass
class BundleResult:
    path: Path
    signer: str
    role: str  # "coordinator" or "member"
    federation_id: str
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # optional files left out, with why (one line each)


def tensor_bound(spec: Spec, key: str) -> int:
    """Largest legitimate size of the tensor file at key: the spec's model, encoded as the spec says."""
    from fedcli import models
    from fedcli.protocol import compression

    shapes = models.shapes(spec.model, spec.data.n_features)
    if "/updates/" in key and not spec.secagg.enabled:  # masked updates are uint32: same size as float32
        enc, dtypes = compression.layout(spec.strategy.compression_meta, shapes)
        return max(tensors.max_file_size(shapes), tensors.max_file_size(enc, tensors.itemsizes(enc, dtypes)))
    return tensors.max_file_size(shapes)


def kind_bound(spec: Spec | None, key: str) -> int:
    """The bound of a store key's kind: spec 1 MiB, signature 1 KiB, documents 64 KiB, tensors by the model."""
    if key == SPEC_KEY or _CHAIN_SPEC.match(key):
        return MAX_SPEC_BYTES
    if key.startswith("specs/") and key.endswith("/link.json"):
        from fedcli.protocol.chain import MAX_LINK_BYTES

        return MAX_LINK_BYTES
    if key == SPEC_SIG_KEY:
        return MAX_SIG_BYTES
    if key.endswith(".bin") and "/pairshares/" in key:  # secure aggregation's shares of pairwise seeds
        if spec is None:
            raise VerificationError(f"{key}: no verified spec to bound pairwise-seed shares by")
        from fedcli.secagg.pairshares import file_bytes

        return file_bytes(len(spec.members))
    if key.endswith(".safetensors"):
        if spec is None:
            raise VerificationError(f"{key}: no verified spec to bound tensors by")
        return tensor_bound(spec, key)
    return MAX_MANIFEST_BYTES


# -- export ---------------------------------------------------------------------------


def export_bundle(store: Store, key_path: Path, out: Path) -> BundleResult:
    """Pack what the holder of key_path must send, each file verified: coordinator globals, or a bank's files."""
    private, pub_b64 = keys.load_private(key_path)
    spec, spec_sha, coordinator = _exporter_spec(store, pub_b64)
    skipped: list[str] = []
    if coordinator:
        role, signer = "coordinator", spec.coordinator.name
        files = _coordinator_files(store, spec, skipped)
    else:
        me = spec.member_by_key(pub_b64)
        if me is None:
            raise FedcliError(f"{key_path} is neither the coordinator nor a member of federation {spec.federation_id}")
        role, signer = "member", me.name
        files = _member_files(store, spec, spec_sha, keys.PublicIdentity(me.name, pub_b64), skipped)
    index = {
        "kind": "bundle",
        "format": FORMAT,
        "federation_id": spec.federation_id,
        "signer": signer,
        "role": role,
        "created_at": now(),
        "files": [{"key": k, "size": len(v), "sha256": sha256(v)} for k, v in files.items()],
    }
    body = keys.canonical(index)
    sig = keys.sign_bytes(private, body, BUNDLE_DOMAIN).encode()
    _write_tar(out, [("bundle.json", body), ("bundle.sig", sig)] + [(f"files/{k}", v) for k, v in files.items()])
    return BundleResult(Path(out), signer, role, spec.federation_id, written=list(files), skipped=skipped)


def _exporter_spec(store: Store, pub_b64: str) -> tuple[Spec, str, bool]:
    """The store's spec (with its verified version chain), its sha256, and whether the exporter is its coordinator.

    The coordinator is the key the newest version names: after `spec amend --new-key` that is the
    new key (the chain walk verified every version under the key before it). A key that signed
    only older versions may no longer speak for the federation.
    """
    from fedcli.protocol import chain

    try:  # some version must name this key for it to be the coordinator's (as before the chain: its signature)
        spec, spec_sha = load_spec(store, keys.PublicIdentity("coordinator", pub_b64))
    except VerificationError:  # a bank (or a stranger): the spec as every command reads it
        spec, spec_sha = load_spec(store, None)
    walked = spec.chain
    latest = walked.latest.spec if isinstance(walked, chain.Chain) else spec
    if latest.coordinator.ed25519 == pub_b64:
        return _with_chain_coordinator(spec, latest), spec_sha, True
    if spec.member_by_key(pub_b64) is None and any(
        v.spec.coordinator.ed25519 == pub_b64 for v in getattr(walked, "versions", ())
    ):
        raise VerificationError(
            f"this coordinator key was rotated out: spec version {walked.latest.number} names "
            f"{latest.coordinator.fingerprint}; export with the new coordinator key",
            reason="not-member",
        )
    return spec, spec_sha, False


def _with_chain_coordinator(spec: Spec, latest: Spec) -> Spec:
    """The spec in force, signed for by the newest coordinator (a rotation announced for a later round)."""
    from dataclasses import replace

    return spec if spec.coordinator == latest.coordinator else replace(spec, coordinator=latest.coordinator)


def _coordinator_files(store: Store, spec: Spec, skipped: list[str]) -> dict[str, bytes]:
    """The spec and its versions, the statistics document, signed rejections (optional), the latest global
    tensors, every global manifest, the open round's drops, and the final marker last."""
    rounds = global_rounds(store)
    fid = spec.federation_id
    files = {**_spec_files(store, spec), **_chain_files(store, spec), **_statistics_file(store, spec)}
    if not rounds:
        from fedcli.protocol.statistics import pending

        if not pending(spec):
            raise FedcliError(f"{store} has no global model yet: run `fedcli init` first")
        return files  # the statistics round: banks need the spec to contribute
    for r in rounds:
        key = rejections_key(r)
        try:
            data = store.get(key, max_bytes=MAX_MANIFEST_BYTES)
            signer = spec_for_round(spec, None, r)[0].coordinator
            _verified(data, signer, key, kind="rejections", federation_id=fid, round=r)
        except NotFound:
            continue
        except FedcliError as e:  # optional: a list the coordinator did not sign (or a link) is not carried
            skipped.append(f"{key} not packed: {e}")
        else:
            files[key] = data
    manifests = {}
    for r in rounds:
        key = global_keys(r)[1]
        data = store.get(key, max_bytes=MAX_MANIFEST_BYTES)
        signer = spec_for_round(spec, None, r)[0].coordinator  # the version in force for round r
        manifests[key] = data, _verified(data, signer, key, kind="global", federation_id=fid, round=r)
    latest = rounds[-1]
    tkey, mkey = global_keys(latest)
    files[tkey] = _tensors(store, tkey, manifests[mkey][1].get("tensors_sha256"), kind_bound(spec, tkey))
    files.update({k: data for k, (data, _) in manifests.items()})  # manifests after the tensors they name
    drops = f"{round_dir(latest + 1)}/secagg/drops.json"  # secure aggregation's dropouts
    if store.exists(drops):
        data = store.get(drops, max_bytes=MAX_MANIFEST_BYTES)
        doc = _verified(data, spec.coordinator, drops, kind="secagg-drops", federation_id=fid, round=latest + 1)
        files[drops] = data
        files.update(_survivor_manifests(store, spec, latest + 1, doc.get("survivors")))
    files.update(_final_file(store, spec, skipped))
    return files


def _spec_files(store: Store, spec: Spec) -> dict[str, bytes]:
    """Version 1's raw bytes and signature, packed only if they are the bytes the chain walk verified."""
    data = store.get(SPEC_KEY, max_bytes=MAX_SPEC_BYTES)
    sig = store.get(SPEC_SIG_KEY, max_bytes=MAX_SIG_BYTES)
    first = spec.chain.versions[0] if spec.chain is not None else None
    signer = first.spec.coordinator if first is not None else spec.coordinator
    keys.verify_bytes(data, sig.decode("ascii", "replace"), signer, "federation spec")
    if first is not None and sha256(data) != first.sha:
        raise VerificationError("the federation spec changed while it was packed; not packed", reason="bad-hash")
    return {SPEC_KEY: data, SPEC_SIG_KEY: sig}


def _statistics_file(store: Store, spec: Spec) -> dict[str, bytes]:
    """The coordinator's signed statistics document (federated statistics), once published."""
    try:
        data = store.get(STATISTICS_KEY, max_bytes=MAX_MANIFEST_BYTES)
    except NotFound:
        return {}
    signer = spec_for_round(spec, None, 0)[0].coordinator  # published before round 0
    _verified(data, signer, STATISTICS_KEY, kind="statistics", federation_id=spec.federation_id)
    return {STATISTICS_KEY: data}


def _final_file(store: Store, spec: Spec, skipped: list[str]) -> dict[str, bytes]:
    """The signed end of the federation: banks behind the gap stop spending budget on rounds that never come."""
    try:
        data = store.get(FINAL_KEY, max_bytes=MAX_MANIFEST_BYTES)
        _verified(data, spec.coordinator, FINAL_KEY, kind="final", federation_id=spec.federation_id)
    except NotFound:
        return {}
    except FedcliError as e:  # like an unsigned rejections list: never shown as the end, never carried
        skipped.append(f"{FINAL_KEY} not packed: {e}")
        return {}
    return {FINAL_KEY: data}


def _survivor_manifests(store: Store, spec: Spec, r: int, survivors) -> dict[str, bytes]:
    """The signed update manifests of a round's survivors: each holds the self-mask shares sealed to the others."""
    files = {}
    for name in sorted(survivors) if isinstance(survivors, dict) else []:
        member = spec.member(name) if isinstance(name, str) else None
        if member is None:
            continue
        mkey = update_keys(r, name)[1]
        try:
            data = store.get(mkey, max_bytes=MAX_MANIFEST_BYTES)
        except NotFound:
            continue
        doc = _verified(data, member, mkey, kind="update", federation_id=spec.federation_id, round=r, member=name)
        files.update(_pair_shares(store, spec, r, name, doc))
        files[mkey] = data
    return files


def _pair_shares(store: Store, spec: Spec, r: int, name: str, manifest: dict) -> dict[str, bytes]:
    """A masked update's pair-shares file (secagg.pairshares), packed only with the sha256 its manifest signs."""
    record = manifest.get("secagg")
    expected = record.get("pair_shares_sha256") if isinstance(record, dict) else None
    if not isinstance(expected, str):
        return {}
    key = f"{round_dir(r)}/pairshares/{name}.bin"
    try:
        return {key: _tensors(store, key, expected, kind_bound(spec, key))}
    except NotFound:
        return {}


def _chain_files(store: Store, spec: Spec) -> dict[str, bytes]:
    """Spec versions 2.. that are in force, announced or awaiting countersignatures (verified by load_spec's walk), their
    countersignatures, each spec file packed only if it still has the sha256 its link signs."""
    from fedcli.protocol import chain

    files: dict[str, bytes] = {}
    walked = spec.chain
    versions = [*walked.versions[1:], *filter(None, [walked.pending])] if isinstance(walked, chain.Chain) else []
    for v in versions:  # a pending version too: a bank behind the gap must see it to countersign it
        data = store.get(chain.spec_key(v.number), max_bytes=MAX_SPEC_BYTES)
        if sha256(data) != v.sha:
            raise VerificationError(
                f"spec version {v.number} changed while it was packed; not packed", reason="bad-hash"
            )
        files[chain.spec_key(v.number)] = data
        for member in v.countersigned_by:
            key = chain.countersign_key(v.number, member)
            files[key] = store.get(key, max_bytes=MAX_MANIFEST_BYTES)
        files[chain.link_key(v.number)] = store.get(chain.link_key(v.number), max_bytes=chain.MAX_LINK_BYTES)
    return files


def _member_files(
    store: Store, spec: Spec, spec_sha: str, me: keys.PublicIdentity, skipped: list[str]
) -> dict[str, bytes]:
    """Everything this bank signed that the coordinator's store needs: its committed update of the open
    round and recovery shares, its holdout evaluations, its statistics contribution, its key rotation
    statements and countersignatures. Each file is verified against the bank's key; one that does not
    verify (a file planted at its place, or signed by its previous key) is left out with a line."""
    files = _open_update(store, spec, me)
    files.update(_evaluations(store, spec, me, skipped))
    files.update(_contribution(store, spec, spec_sha, me, skipped))
    files.update(_chain_statements(store, spec, me, skipped))
    if not files:
        published = global_rounds(store)
        what = (
            f"update for round {published[-1] + 1} (`fedcli train`)"
            if published
            else "statistics contribution (`fedcli stats submit`)"
        )
        raise FedcliError(f"{me.name} has nothing to send from {store}: no committed {what}")
    return files


def _open_update(store: Store, spec: Spec, me: keys.PublicIdentity) -> dict[str, bytes]:
    """The bank's committed update of the open round (manifest signed by it, tensors of the signed hash), recovery."""
    published = global_rounds(store)
    if not published:
        return {}
    r = published[-1] + 1
    tkey, mkey = update_keys(r, me.name)
    try:
        manifest_bytes = store.get(mkey, max_bytes=MAX_MANIFEST_BYTES)
    except NotFound:
        return {}
    fid = spec.federation_id
    manifest = _verified(manifest_bytes, me, mkey, kind="update", federation_id=fid, round=r, member=me.name)
    files = {tkey: _tensors(store, tkey, manifest.get("tensors_sha256"), kind_bound(spec, tkey))}
    files.update(_pair_shares(store, spec, r, me.name, manifest))
    files[mkey] = manifest_bytes
    recovery = f"{round_dir(r)}/secagg/recovery/{me.name}.json"  # secure aggregation's dropouts
    if store.exists(recovery):
        data = store.get(recovery, max_bytes=MAX_MANIFEST_BYTES)
        _verified(data, me, recovery, kind="secagg-recovery", federation_id=fid, round=r, member=me.name)
        files[recovery] = data
    return files


def _optional(
    store: Store, key: str, me: keys.PublicIdentity, skipped: list[str], check=None, **expected
) -> dict[str, bytes]:
    """One of the bank's own signed documents, or nothing (with a line) when it does not verify as such."""
    try:
        data = store.get(key, max_bytes=MAX_MANIFEST_BYTES)
        doc = _verified(data, me, key, member=me.name, **expected)
        if check is not None:
            check(doc)
    except NotFound:
        return {}
    except FedcliError as e:
        skipped.append(f"{key} not packed: {e}")
        return {}
    return {key: data}


def _evaluations(store: Store, spec: Spec, me: keys.PublicIdentity, skipped: list[str]) -> dict[str, bytes]:
    """The bank's signed holdout evaluations of published globals (protocol.evaluations); those made while
    another key of this bank was in force (before a rotation) crossed with that key's bundles."""
    files: dict[str, bytes] = {}
    mine = re.compile(rf"^rounds/(\d{{6}})/evaluations/{re.escape(me.name)}\.json$")
    published = set(global_rounds(store))
    for key in store.list("rounds"):
        m = mine.match(key)
        r = int(m.group(1)) if m else -1
        if r not in published or _key_then(spec, r + 1, me.name) != me.ed25519:  # scored while round r+1 trained
            continue
        files.update(_optional(store, key, me, skipped, kind="evaluation", federation_id=spec.federation_id, round=r))
    return files


def _key_then(spec: Spec, r: int, name: str) -> str | None:
    member = spec_for_round(spec, None, r)[0].member(name)
    return member.ed25519 if member is not None else None


def _contribution(
    store: Store, spec: Spec, spec_sha: str, me: keys.PublicIdentity, skipped: list[str]
) -> dict[str, bytes]:
    """The bank's statistics contribution, while the statistics round is open (protocol.statistics)."""
    from fedcli.protocol import statistics as stats

    if not stats.pending(spec):
        return {}
    key = stats.contribution_key(spec_sha, me.name)
    if not store.exists(key):
        return {}
    try:
        stats.verify_contribution(store, spec, spec_sha, me.name)  # signature, contract, place and encoding
    except FedcliError as e:
        skipped.append(f"{key} not packed: {e}")
        return {}
    return {key: store.get(key, max_bytes=MAX_MANIFEST_BYTES)}


def _chain_statements(store: Store, spec: Spec, me: keys.PublicIdentity, skipped: list[str]) -> dict[str, bytes]:
    """The bank's key rotation statements (signed by its current key) and its countersignatures of spec versions."""
    from fedcli.protocol import chain

    files: dict[str, bytes] = {}
    fid = spec.federation_id
    done = chain.rotation_key(me.name, me.ed25519)  # the rotation to this key: in force, the coordinator has it
    for key in store.list(f"specs/rotations/{me.name}"):
        if key != done and re.fullmatch(rf"specs/rotations/{re.escape(me.name)}/[0-9a-f]{{16}}\.json", key):
            files.update(
                _optional(
                    store,
                    key,
                    me,
                    skipped,
                    check=functools.partial(_rotation_at, key),
                    kind="key-rotation",
                    federation_id=fid,
                    old_ed25519=me.ed25519,
                )
            )
    for key in store.list("specs"):
        m = re.fullmatch(rf"specs/(\d{{6}})/countersign/{re.escape(me.name)}\.json", key)
        if m:
            version = int(m.group(1))
            files.update(
                _optional(store, key, me, skipped, kind="spec-countersign", federation_id=fid, version=version)
            )
    return files


def _rotation_at(key: str, doc: dict) -> None:
    """A rotation statement sits at the place its new key names (chain.rotation_key)."""
    from fedcli.protocol import chain

    new = doc.get("new_ed25519")
    if not isinstance(new, str) or chain.rotation_key(str(doc.get("member")), new) != key:
        raise VerificationError(f"{key}: names another new key than its place", reason="wrong-round")


def _verified(data: bytes, signer: keys.PublicIdentity, key: str, **expected) -> dict:
    """A signed document's content, after its signature and its place (kind, federation, round) check out."""
    doc = keys.verify_manifest(data, signer, key)
    expect(doc, key, **expected)
    return doc


def _tensors(store: Store, key: str, expected_sha, bound: int) -> bytes:
    """A tensor file read within its bound, packed only if its sha256 is the one its verified manifest names."""
    data = store.get(key, max_bytes=bound)
    if sha256(data) != expected_sha:
        raise VerificationError(
            f"{key} does not match the sha256 in its signed manifest; not packed", reason="bad-hash"
        )
    return data


def _write_tar(out: Path, entries: list[tuple[str, bytes]]) -> None:
    """Write atomically (files.atomic_writer) with fixed metadata, so a half-copied bundle never looks whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(out, ".bundle-") as f, tarfile.open(fileobj=f, mode="w:", format=tarfile.PAX_FORMAT) as tar:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    except OSError as e:
        raise FedcliError(f"cannot write bundle {out}: {e.strerror or e}") from None


# -- import ---------------------------------------------------------------------------


class _BoundedFile:
    """The archive as tarfile sees it: while headers are walked, each read and all of them together are bounded.

    tarfile reads a pax record or a GNU long name whole, at the size its header claims, before
    we see the member: without this a 1.5 GiB pax header would be read into memory.
    """

    def __init__(self, f, path: Path):
        self.f, self.path, self.name, self.mode = f, path, str(path), "rb"
        self.limit: int | None = MAX_HEADER_READ
        self.budget = MAX_HEADER_TOTAL

    def read(self, n: int = -1) -> bytes:
        if self.limit is not None:
            if n is None or n < 0 or n > self.limit or n > self.budget:
                raise Oversize(f"{self.path}: a tar header is larger than any bundle needs; not read")
            self.budget -= n
        return self.f.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def write(self, data: bytes) -> int:
        """Part of the file interface tarfile expects; a bundle is only ever read through this."""
        raise io.UnsupportedOperation(f"{self.path} is open for reading")

    def close(self) -> None:
        """Part of the file interface tarfile expects; the caller's `with open(...)` closes the file."""


# What a hostile tar header can make tarfile raise (besides TarError): bad numbers, truncated sparse maps.
_TAR_FAULTS = (tarfile.TarError, EOFError, ValueError, IndexError, KeyError, OverflowError, UnicodeError)


def import_bundle(store: Store, path: Path, coordinator_pub: Path | None = None) -> BundleResult:
    """Verify a bundle and write its files into store; files already there unchanged are skipped.

    Order: tar headers (bounded) -> index and signature (bounded) -> signature over the raw
    index -> index contract -> each member against its signed size and its kind's bound ->
    contents and hashes. Nothing is written until everything checked out.
    """
    path = Path(path)
    pinned = keys.load_public(coordinator_pub) if coordinator_pub else None
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FedcliError(f"bundle {path} does not exist") from None
    except OSError as e:
        raise FedcliError(f"cannot read bundle {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever, a device never ends
        raise InputError(f"bundle {path} is not a regular file")
    if st.st_size > MAX_BUNDLE_BYTES:
        raise Oversize(
            f"{path} is {st.st_size:,} bytes, more than the {MAX_BUNDLE_BYTES >> 30} GiB a bundle may have; not read"
        )
    try:
        with open(path, "rb") as raw:
            bounded = _BoundedFile(raw, path)
            with tarfile.open(fileobj=bounded, mode="r:") as tar:  # uncompressed only: no decompression bombs
                members = _members(tar, path)
                bounded.limit = None  # headers done: from here every read is sized by a checked bound
                index, role, signer, spec, spec_sha = _index(tar, members, store, pinned, path)
                if index.federation_id != spec.federation_id:
                    raise VerificationError(
                        f"{path} is for federation {index.federation_id!r}, the store holds {spec.federation_id!r}",
                        reason="wrong-round",
                    )
                entries = _contents(tar, members, index, spec, role, signer, path)
                _documents(entries, spec, spec_sha, role, signer, path)
    except FedcliError:
        raise
    except _TAR_FAULTS:
        raise VerificationError(
            f"{path} is not a readable bundle (truncated or not a tar archive)", reason="malformed"
        ) from None
    except OSError as e:
        raise FedcliError(f"cannot read bundle {path}: {e.strerror}") from None

    result = BundleResult(path, signer.name, role, spec.federation_id)
    _write(store, entries, result)
    return result


def _members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """Headers only: regular, non-sparse files named bundle.json, bundle.sig or files/..., each once."""
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar:
        if not m.isreg() or m.type == tarfile.GNUTYPE_SPARSE:
            raise VerificationError(f"{path}: {m.name!r} is not a regular file; refused", reason="not-regular")
        if m.issparse():
            raise VerificationError(
                f"{path}: {m.name!r} is a sparse member; refused before reading", reason="not-regular"
            )
        if m.name in members or (m.name not in _INDEX_NAMES and not m.name.startswith("files/")):
            raise VerificationError(f"{path}: unexpected or repeated member {m.name!r}", reason="malformed")
        if len(members) >= MAX_FILES + len(_INDEX_NAMES):
            raise VerificationError(f"{path} has more than {MAX_FILES:,} files", reason="oversize")
        members[m.name] = m
    return members


def _index(tar, members, store: Store, pinned, path: Path):
    """The signed index: bounded generic parse to find the signer, the spec the signer is checked against,
    signature over the raw bytes, then the contract."""
    body = _read(tar, members.get("bundle.json"), "bundle.json", MAX_INDEX_BYTES, path)
    sig = _read(tar, members.get("bundle.sig"), "bundle.sig", MAX_SIG_BYTES, path)
    raw = load_json(body, f"{path}: bundle index", MAX_INDEX_BYTES)
    name = raw.get("signer") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        raise ContractError(f"{path}: bundle index names no signer")
    carried = _spec_entries(tar, members, raw, path)
    if pinned is not None and SPEC_KEY not in carried and not store.exists(SPEC_KEY):
        keys.verify_bytes(body, sig.decode("ascii", "replace"), pinned, f"bundle {path.name}", BUNDLE_DOMAIN)
        validate(index_model(), raw, f"{path}: bundle index")  # a genuine index that is malformed says how
    spec, spec_sha = _spec(store, carried, pinned, path)
    role, signer = _signer(spec, name, path)
    keys.verify_bytes(body, sig.decode("ascii", "replace"), signer, f"bundle {path.name}", BUNDLE_DOMAIN)
    index = validate(index_model(), raw, f"{path}: bundle index")  # authentic; now it must also be well-formed
    if index.role != role:
        raise ContractError(f"{path}: index says role {index.role!r} but {name} is the {role}")
    if set(members) - set(_INDEX_NAMES) != {f"files/{f.key}" for f in index.files}:
        raise VerificationError(f"{path}: archive files differ from the signed index", reason="malformed")
    return index, role, signer, spec, spec_sha


def _spec_entries(tar, members, raw: dict, path: Path) -> dict[str, bytes]:
    """The bundle's spec versions and statistics document, each read within its kind's bound.

    Read before the bundle's signature is checked: the chain walk verifies each of them under the
    key the version before names (from the pinned key or the store's own spec), so a bundle signed
    by a rotated coordinator key, or one bringing the statistics a global's shape depends on, can be
    checked against the spec it brings.
    """
    listed = raw.get("files")
    listed = [f.get("key") if isinstance(f, dict) else None for f in listed] if isinstance(listed, list) else []
    found: dict[str, bytes] = {}
    budget = MAX_SPEC_FILES_BYTES
    for key in listed:
        if isinstance(key, str) and _SPEC_READ.match(key):
            if f"files/{key}" not in members:  # a half-copied archive
                raise VerificationError(f"{path}: archive files differ from the signed index", reason="malformed")
            budget -= members[f"files/{key}"].size
            if budget < 0:  # read before the signature: bounded in total, not only one by one
                raise Oversize(f"{path}: its spec files are larger than {MAX_SPEC_FILES_BYTES >> 20} MiB; not read")
            found[key] = _read(tar, members[f"files/{key}"], key, kind_bound(None, key), path)
    return found


def _spec(store: Store, carried: dict[str, bytes], pinned, path: Path) -> tuple[Spec, str]:
    """The verified spec the bundle is checked against: the destination's, with the spec files the
    bundle carries where the store has none (store files win; a differing one is refused on write)."""
    if not store.exists(SPEC_KEY):
        if pinned is None:
            raise FedcliError(
                f"{path}: the store holds no federation yet; pass --coordinator coordinator.pub to import the first bundle"
            )
        if SPEC_KEY not in carried or SPEC_SIG_KEY not in carried:
            raise VerificationError(
                f"{path} does not carry the federation spec the empty store needs", reason="missing"
            )
    return load_spec(_Overlay(store, carried) if carried else store, pinned)


class _Overlay(BaseStore):
    """The store as the spec reader sees it, with a bundle's spec files added (read-only)."""

    def __init__(self, store: Store, extra: dict[str, bytes]):
        self.store, self.extra, self.url = store, extra, store.url

    def get(self, key: str, *, max_bytes: int) -> bytes:
        try:
            return self.store.get(key, max_bytes=max_bytes)
        except NotFound:
            if key not in self.extra:
                raise
        if len(self.extra[key]) > max_bytes:
            raise Oversize(f"{key} in the bundle is larger than {max_bytes:,} bytes")
        return self.extra[key]

    def exists(self, key: str) -> bool:
        return key in self.extra or self.store.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        under = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(set(self.store.list(prefix)) | {k for k in self.extra if k.startswith(under)})

    def size(self, key: str) -> int:
        return len(self.extra[key]) if key in self.extra and not self.store.exists(key) else self.store.size(key)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        raise io.UnsupportedOperation("the spec reader never writes")

    def delete(self, key: str) -> None:
        raise io.UnsupportedOperation("the spec reader never deletes")

    def __str__(self) -> str:
        return self.url


def _contents(tar, members, index, spec: Spec, role: str, signer, path: Path) -> dict[str, bytes]:
    """Every member: allowed for its signer, its signed size, within its kind's bound; then read and hashed."""
    allowed = _COORD_KEYS if role == "coordinator" else _member_keys(signer.name)
    tensor_files = 0
    for f in index.files:
        if not allowed.match(f.key):
            raise VerificationError(f"{path}: {signer.name} may not write {f.key}", reason="not-member")
        tensor_files += f.key.endswith(".safetensors")
        if tensor_files > MAX_TENSOR_FILES:
            raise Oversize(f"{path} carries more than {MAX_TENSOR_FILES} tensor file; refused before reading")
        bound = kind_bound(spec, f.key)
        if f.size > bound:
            raise Oversize(f"{path}: {f.key} is {f.size:,} bytes, more than the {bound:,} its kind allows; not read")
        if members[f"files/{f.key}"].size != f.size:
            raise VerificationError(f"{path}: {f.key} does not match its size in the signed index", reason="malformed")
    entries = {}
    for f in index.files:
        data = _read(tar, members[f"files/{f.key}"], f.key, f.size, path)
        if sha256(data) != f.sha256:
            raise VerificationError(f"{path}: {f.key} does not match its sha256 in the signed index", reason="bad-hash")
        entries[f.key] = data
    return entries


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo | None, name: str, bound: int, path: Path) -> bytes:
    """One member's bytes, refused before reading when its header claims more than bound."""
    if info is None:
        raise VerificationError(f"{path} is not a fedcli bundle (no {name})", reason="missing")
    if info.size > bound:
        raise Oversize(f"{path}: {name} is {info.size:,} bytes, more than the {bound:,} allowed; not read")
    f = tar.extractfile(info)
    data = f.read(info.size) if f else b""
    if len(data) != info.size:
        raise VerificationError(f"{path} is truncated ({name} is incomplete)", reason="malformed")
    return data


def _signer(spec: Spec, name: str, path: Path) -> tuple[str, keys.PublicIdentity]:
    """The coordinator is the key the newest verified version names; a member, as the spec in force names it."""
    from fedcli.protocol import chain

    walked = spec.chain
    coordinator = walked.latest.spec.coordinator if isinstance(walked, chain.Chain) else spec.coordinator
    if name == coordinator.name:
        return "coordinator", coordinator
    member = spec.member(name)
    if member is None:
        raise VerificationError(
            f"{path} is signed by {name!r}, who is not in federation {spec.federation_id}",
            reason="not-member",
        )
    return "member", member


def _documents(entries: dict[str, bytes], spec: Spec, spec_sha: str, role: str, signer, path: Path) -> None:
    """Each signed document of a member is that member's, for this federation, at its own place; the
    coordinator's statistics document and final marker are signed by it."""
    from fedcli.protocol.statistics import contribution_key

    fid = spec.federation_id
    for key, data in entries.items():
        what = f"{path.name}: {key}"
        if role == "member" and key.endswith(".json"):
            doc = _verified(data, signer, what, federation_id=fid, member=signer.name)
            if key.startswith("statistics/") and key != contribution_key(spec_sha, signer.name):
                raise VerificationError(f"{what}: a contribution to another spec version", reason="wrong-round")
            if key.startswith("specs/rotations/"):
                _rotation_at(key, doc)
        elif key == FINAL_KEY:
            _verified(data, signer, what, kind="final", federation_id=fid)
        elif key == STATISTICS_KEY:
            _verified(data, spec_for_round(spec, None, 0)[0].coordinator, what, kind="statistics", federation_id=fid)


def _write(store: Store, entries: dict[str, bytes], result: BundleResult) -> None:
    """Check every conflict first, then write: spec and statistics, tensors, rejections, manifests (commit
    markers), and the final marker last, so an import cut short never leaves a document naming a missing one."""
    todo = []
    for key, data in entries.items():
        try:
            current = store.get(key, max_bytes=len(data))
        except NotFound:
            current = None
        except Oversize:
            current = b""  # larger than ours: different
        if current == data:
            result.unchanged.append(key)
        elif current is None or key.endswith("rejections.json"):  # new, or the coordinator's latest word
            todo.append(key)
        elif key.endswith(".safetensors") and not _committed(store, key):
            todo.append(key)  # left over by a crashed upload: nothing refers to it yet
        else:
            raise VerificationError(f"the store already holds a different {key}; not overwritten, nothing imported")

    def rank(key: str) -> tuple:
        kind = (
            0
            if key in _SPEC_KEYS or key.startswith("specs/") or key == STATISTICS_KEY  # what globals are checked by
            else 1
            if key.endswith(".safetensors")
            else 2
            if key.endswith("rejections.json")
            else 4
            if key == FINAL_KEY  # names the last global: written after it
            else 3
        )
        return (kind, key)

    for key in sorted(todo, key=rank):
        manifest = key.endswith(".json") and not key.endswith("rejections.json")
        try:
            store.put(key, entries[key], create_only=manifest)
        except AlreadyExists:  # another import won the race with, by construction, a manifest of its own
            if store.get(key, max_bytes=len(entries[key]) + 1) != entries[key]:
                raise VerificationError(f"the store already holds a different {key}; not overwritten") from None
            result.unchanged.append(key)
            continue
        result.written.append(key)


def _committed(store: Store, tensors_key: str) -> bool:
    """True if a tensor file already has its manifest: then it must not change."""
    return store.exists(tensors_key[: -len(".safetensors")] + ".json")
