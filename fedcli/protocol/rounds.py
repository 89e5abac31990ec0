"""The round protocol: which file in the store means what, and how each one is verified.

    federation.toml, federation.toml.sig          signed spec
    rounds/000000/global.safetensors, global.json  round-0 model and its signed manifest
    rounds/00000N/updates/<member>.safetensors     update trained on global N-1 (a delta)
    rounds/00000N/updates/<member>.json            its signed manifest: the commit marker
    rounds/00000N/rejections.json                  why the coordinator refused some updates (signed)
    rounds/00000N/global.safetensors, global.json  the aggregate of round N

Tensors are always written before their manifest, so a manifest that exists names tensors
that exist; a crash leaves at worst tensors without a manifest, which everyone ignores.
Every JSON document is read bounded, parsed depth-bounded, signature-checked, then validated
into its class in fedcli.protocol.documents (see docs/protocol.md for the order and the reason codes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from fedcli.digest import sha256_stream
from fedcli.errors import ContractError, FedcliError, NotFound, NotRegular, Oversize, StoreError, VerificationError
from fedcli.keys import MAX_MANIFEST_BYTES, PublicIdentity, verify_manifest
from fedcli.privacy.policy import check_declared
from fedcli.protocol import compression
from fedcli.protocol.spec import MAX_SIG_BYTES, MAX_SPEC_BYTES, Spec  # noqa: F401 (re-exported)
from fedcli.protocol.tensors import Shapes, check_finite, decode, itemsizes, max_file_size
from fedcli.store import Store

if TYPE_CHECKING:  # pydantic is imported lazily, only where a document is validated
    from fedcli.protocol.documents import UpdateManifest

SPEC_KEY = "federation.toml"
SPEC_SIG_KEY = "federation.toml.sig"
FORMAT = 1


def round_dir(r: int) -> str:
    return f"rounds/{r:06d}"


def global_keys(r: int) -> tuple[str, str]:
    return f"{round_dir(r)}/global.safetensors", f"{round_dir(r)}/global.json"


def update_keys(r: int, member: str) -> tuple[str, str]:
    return f"{round_dir(r)}/updates/{member}.safetensors", f"{round_dir(r)}/updates/{member}.json"


def server_state_key(r: int) -> str:
    """Server optimiser state after round r; its sha256 is in round r's signed global manifest."""
    return f"{round_dir(r)}/server_state.safetensors"


def rejections_key(r: int) -> str:
    return f"{round_dir(r)}/rejections.json"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_spec(store: Store, pinned: PublicIdentity | None) -> tuple[Spec, str]:
    """The spec in force for the next round to play, from its verified version chain (protocol.chain).

    The Spec returned carries the chain: documents of an earlier round are checked against the
    version in force for that round (`chain.in_force`).
    """
    from fedcli.protocol import chain
    from fedcli.protocol.statistics import resolve  # federated statistics fill the data section

    walked = chain.walk(store, pinned)
    if len(walked.versions) == 1:  # one version is in force for every round: no need to list the rounds
        spec, spec_sha = walked.spec_at(0)
    else:
        published = global_rounds(store)
        spec, spec_sha = walked.spec_at(published[-1] + 1 if published else 0)
    return resolve(store, spec, spec_sha), spec_sha


def spec_for_round(spec: Spec, spec_sha: str | None, r: int) -> tuple[Spec, str | None]:
    """The version of the spec in force for round r (the spec itself when it was read without a chain)."""
    from fedcli.protocol.chain import in_force

    return in_force(spec, spec_sha, r)


def global_rounds(store: Store) -> list[int]:
    """Rounds whose global manifest exists (committed), ascending."""
    found = []
    for key in store.list("rounds"):
        m = re.fullmatch(r"rounds/(\d{6})/global\.json", key)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def latest_round(store: Store) -> int:
    rounds = global_rounds(store)
    if not rounds:
        raise FedcliError(f"{store} has no global model yet: run `fedcli init` first")
    return rounds[-1]


def read_manifest(store: Store, key: str, what: str) -> bytes:
    """A signed JSON document's bytes, refused before reading when larger than any fedcli writes."""
    try:
        return store.get(key, max_bytes=MAX_MANIFEST_BYTES)
    except Oversize as e:
        raise Oversize(f"{what}: {e}") from None


def read_tensors(
    store: Store,
    key: str,
    expected_sha: str,
    shapes: Shapes,
    what: str,
    dtype: str | dict[str, str] = "float32",
    buffer: bytearray | None = None,
):
    """Stream, hash and decode a tensor file; the hash must match the signed manifest.

    The bytes are hashed chunk by chunk as they land (one pass, cache-hot) and decoded in
    place, never copied. With `buffer` (the coordinator reuses one for every update) nothing
    is allocated per file; the arrays returned are then views into it, valid until its next use.
    """
    try:
        size = store.size(key)
    except NotFound:
        raise VerificationError(f"{what}: tensor file is missing", reason="missing") from None
    if size > max_file_size(shapes, itemsizes(shapes, dtype)):
        raise Oversize(f"{what}: tensor file is larger than the model allows ({size:,} bytes)")
    buf = memoryview(buffer if buffer is not None and len(buffer) >= size else bytearray(size))
    try:
        actual_sha, n = sha256_stream(store.read_into(key, buf))
    except NotFound:
        raise VerificationError(f"{what}: tensor file is missing", reason="missing") from None
    if actual_sha != expected_sha:
        raise VerificationError(f"{what}: tensors do not match the sha256 in the signed manifest", reason="bad-hash")
    return decode(buf[:n], shapes, what, dtype)


def expect(manifest, what: str, **fields) -> None:
    """A signed document must name the place it sits in (federation, round, member, ...)."""
    for name, value in fields.items():
        got = manifest.get(name) if isinstance(manifest, dict) else getattr(manifest, name, None)
        if got != value:
            shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
            raise VerificationError(f"{what}: manifest {name} is {shown}, expected {value!r}", reason="wrong-round")


@dataclass
class Global:
    round: int
    tensors: dict[str, np.ndarray]
    manifest: dict  # verified and validated against documents.GlobalManifest

    @property
    def sha256(self) -> str:
        return self.manifest["tensors_sha256"]


def global_manifest(store: Store, spec: Spec, spec_sha: str, r: int) -> dict:
    """The verified manifest of round r's global model (signature and spec binding), without its tensors."""
    from fedcli.contract import validate
    from fedcli.protocol.documents import GlobalManifest

    what = f"global model of round {r}"
    spec, found = spec_for_round(spec, spec_sha, r)
    spec_sha = found or spec_sha
    try:
        manifest = verify_manifest(read_manifest(store, global_keys(r)[1], what), spec.coordinator, what)
    except NotFound:
        raise FedcliError(f"{what} is not published") from None
    validate(GlobalManifest, manifest, what)
    expect(manifest, what, kind="global", federation_id=spec.federation_id, round=r, spec_sha256=spec_sha)
    from fedcli.protocol.statistics import check_global

    check_global(spec, manifest, what)
    return manifest


def load_global(store: Store, spec: Spec, spec_sha: str, r: int, shapes: Shapes) -> Global:
    """Verify and load the global model of round r (signature, spec binding, hash, shapes)."""
    manifest = global_manifest(store, spec, spec_sha, r)
    what = f"global model of round {r}"
    return Global(r, read_tensors(store, global_keys(r)[0], manifest["tensors_sha256"], shapes, what), manifest)


def verify_update(
    store: Store, spec: Spec, r: int, member: str, base_sha: str, shapes: Shapes, buffer: bytearray | None = None
):
    """Check one submitted update; return (UpdateManifest, delta tensors) or raise with the reason.

    Every failure is a FedcliError whose reason code goes into the signed rejections list.
    `buffer` is passed to read_tensors: the delta's arrays are views into it. With secure
    aggregation the tensors are masked uint32 words.
    """
    from fedcli.contract import validate
    from fedcli.protocol.documents import UpdateManifest

    what = f"update from {member}"
    spec, spec_sha = spec_for_round(spec, None, r)
    signer = spec.member(member)
    if signer is None:
        raise VerificationError(f"{what}: {member!r} is not an enrolled member", reason="not-member")
    tkey, mkey = update_keys(r, member)
    manifest = validate(UpdateManifest, verify_manifest(read_manifest(store, mkey, what), signer, what), what)
    expect(manifest, what, kind="update", federation_id=spec.federation_id, round=r, member=member)
    if spec_sha and manifest.spec_sha256 not in (None, spec_sha):
        raise VerificationError(
            f"{what}: made under another version of the spec than round {r}'s", reason="wrong-round"
        )
    if manifest.base_sha256 != base_sha:
        raise VerificationError(
            f"{what}: trained on a different global model (stale or forged base)", reason="stale-base"
        )
    _check_privacy(manifest, spec, what)
    _check_rows(manifest.num_examples, spec, what)
    cmeta = manifest.compression.model_dump(exclude_none=True) if manifest.compression else {"method": "none"}
    if cmeta != spec.strategy.compression_meta:
        raise ContractError(f"{what}: compression {cmeta!r} is not the spec's {spec.strategy.compression_meta!r}")
    if spec.secagg.enabled:  # masked uint32 words, only ever decoded in their sum (secagg_rounds)
        return manifest, read_tensors(store, tkey, manifest.tensors_sha256, shapes, what, "uint32", buffer)
    enc_shapes, dtypes = compression.layout(cmeta, shapes)
    tensors = read_tensors(store, tkey, manifest.tensors_sha256, enc_shapes, what, dtypes, buffer)
    try:
        delta = compression.decode(tensors, cmeta, shapes)
    except FedcliError as e:
        raise ContractError(f"{what}: {e}") from None
    if cmeta["method"] != "none":  # float32 tensors were checked in decode; a dequantised one may overflow
        check_finite(delta, what)
    return manifest, delta


def _check_privacy(manifest: UpdateManifest, spec: Spec, what: str) -> None:
    """No weaker DP than the spec requires; refused as weak-privacy."""
    try:
        check_declared(None if manifest.dp is None else manifest.dp.model_dump(), spec.privacy, what)
    except FedcliError as e:
        raise VerificationError(str(e), reason="weak-privacy") from None
    except (ArithmeticError, ValueError):  # the accountant cannot price absurd (if in-range) parameters
        raise VerificationError(
            f"{what}: its declared DP parameters cannot be accounted for", reason="weak-privacy"
        ) from None


def _check_rows(n: int | None, spec: Spec, what: str) -> None:
    """A plain update names its row count (its weight), within the spec's bound; a DP update must not."""
    if spec.privacy.enabled:  # DP updates carry no row count (it is not privatised); equal weights
        if n is not None:
            raise ContractError(f"{what}: a DP update must not disclose num_examples")
    elif n is None:
        raise ContractError(f"{what}: num_examples is required (a positive integer)")
    elif n > spec.max_rows_per_member:
        raise ContractError(
            f"{what}: num_examples {_magnitude(n)} is more than the spec's max_rows_per_member "
            f"({spec.max_rows_per_member:,})"
        )


def _magnitude(n: int) -> str:
    """A number for a one-line message: 10**400 is shown by its size, not its 401 digits."""
    text = str(n)
    return f"{n:,}" if len(text) <= 15 else f"{text[0]}.{text[1:3]}e+{len(text) - 1}"


def unconsumed_updates(
    store: Store, spec: Spec, spec_sha: str, r: int, max_staleness: int
) -> list[tuple[int, str, str]]:
    """Async mode: committed updates from rounds r-max_staleness..r-1 that no global has folded in yet.

    Returns (update round, member, sha256 of the global it was trained on), oldest first. An
    update in round u was trained on global u-1; the globals since then list what they used.
    """
    first = max(1, r - max_staleness)
    if first >= r:
        return []
    manifests = {g: global_manifest(store, spec, spec_sha, g) for g in range(first - 1, r)}
    used = {
        (c.get("update_round", g), c["member"]) for g in range(first, r) for c in manifests[g].get("contributors", [])
    }
    out = []
    for u in range(first, r):
        committed, _ = submitted_members(store, u)
        out += [(u, m, manifests[u - 1]["tensors_sha256"]) for m in committed if (u, m) not in used]
    return out


def submitted_members(store: Store, r: int) -> tuple[list[str], list[str]]:
    """(members with a manifest, members with tensors but no manifest yet) in round r."""
    committed, partial = set(), set()
    prefix = f"{round_dir(r)}/updates/"
    for key in store.list(prefix.rstrip("/")):
        name = key[len(prefix) :]
        if name.endswith(".json"):
            committed.add(name[:-5])
        elif name.endswith(".safetensors"):
            partial.add(name[: -len(".safetensors")])
    return sorted(committed), sorted(partial - committed)


@dataclass
class RoundRejections:
    """rejections.json of one round as read: entries only count when `verified`."""

    entries: dict[str, dict]  # label -> {"reason", "message"}
    verified: bool
    problem: str = ""  # why it is not verified


def load_rejections(store: Store, spec: Spec, r: int) -> RoundRejections | None:
    """The coordinator-signed rejections of round r; None if there are none.

    Anything else found there (unsigned, forged, too large, too deep, a link) is returned
    unverified with the reason, never as fact, and never raises.
    """
    from fedcli.contract import validate
    from fedcli.protocol.documents import Rejections

    what = f"rejections of round {r}"
    spec, _ = spec_for_round(spec, None, r)
    try:
        doc = verify_manifest(store.get(rejections_key(r), max_bytes=MAX_MANIFEST_BYTES), spec.coordinator, what)
        validate(Rejections, doc, what)
        expect(doc, what, kind="rejections", federation_id=spec.federation_id, round=r)
    except NotFound:
        return None
    except FedcliError as e:
        return RoundRejections({}, False, str(e))
    return RoundRejections(doc["entries"], True)


def write_rejections(store: Store, private, spec: Spec, r: int, entries: dict[str, dict]) -> None:
    """Sign and write round r's rejections (the coordinator's latest word: rewritten each run).

    `entries` maps each refused update's label to documents.rejection(error).
    """
    from fedcli.contract import validate
    from fedcli.keys import sign_manifest
    from fedcli.protocol.documents import Rejections

    doc = {
        "kind": "rejections",
        "format": FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "entries": {_printable(k): v for k, v in sorted(entries.items())},
        "created_at": now(),
    }
    validate(Rejections, doc, f"rejections of round {r}")
    store.put(rejections_key(r), sign_manifest(private, doc))


def _printable(label: str) -> str:
    """A planted file name may hold control characters: its label in the signed list must not."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", label)[:200] or "?"


def read_rejections(store: Store, r: int, spec: Spec | None = None) -> dict[str, str]:
    """Verified rejections of round r as label -> message ({} when none or not verified)."""
    if spec is None:
        spec, _ = load_spec(store, None)
    found = load_rejections(store, spec, r)
    return {k: v["message"] for k, v in found.entries.items()} if found and found.verified else {}


@dataclass
class RoundSummary:
    round: int
    published: bool
    contributors: list[str]
    submitted: list[str]
    pending: list[str]
    rejected: dict[str, dict]  # verified rejections: label -> {"reason", "message"}
    examples: int
    metrics: dict[str, float]  # mean over contributors of each metric they reported
    created_at: str = ""
    bytes_in: int = 0  # update tensor bytes the banks uploaded into this round (what crossed the wire)
    unverified: str = ""  # a rejections.json that does not verify: why (shown, never trusted)
    unsigned: list[str] = field(default_factory=list)  # update manifests no member signed for this round (not counted)


def history(store: Store, pinned: PublicIdentity | None = None) -> tuple[Spec, list[RoundSummary]]:
    """Every round's state, read from signed manifests (signatures checked with the spec's key,
    or with `pinned` when the caller pinned the coordinator's key)."""
    spec, spec_sha = load_spec(store, pinned)
    published = global_rounds(store)
    last = published[-1] if published else -1
    rows = []
    for r in range(0, last + 2):
        manifest = global_manifest(store, spec, spec_sha, r) if r in published else {}
        submitted, pending = submitted_members(store, r)
        if r > last and not submitted and not pending:
            continue
        contributors = manifest.get("contributors", [])
        names = [c["member"] for c in contributors]
        means = {}
        for key in sorted({k for c in contributors for k in c["metrics"]}):
            vals = [c["metrics"][key] for c in contributors if key in c["metrics"]]
            means[key] = sum(vals) / len(vals)
        found = load_rejections(store, spec, r) if r else None
        rejected = found.entries if found and found.verified else {}
        # Only what a member signed for this round counts as submitted; anything else is shown as unsigned.
        unsigned = [
            m for m in submitted if m not in names and m not in rejected and not _signed_update(store, spec, r, m)
        ]
        submitted = [m for m in submitted if m not in unsigned]
        pending = [m for m in pending if spec.member(m) is not None]
        rows.append(
            RoundSummary(
                r,
                r in published,
                names,
                submitted,
                pending,
                rejected,
                sum(c["num_examples"] for c in contributors),
                means,
                manifest.get("created_at", ""),
                _bytes_in(store, r, submitted),
                found.problem if found and not found.verified else "",
                unsigned,
            )
        )
    return spec, rows


def _signed_update(store: Store, spec: Spec, r: int, member: str) -> bool:
    """Whether member's update manifest for round r carries its signature (status only; aggregate checks all)."""
    spec, _ = spec_for_round(spec, None, r)
    signer = spec.member(member)
    if signer is None:
        return False
    what = f"update from {member}"
    try:
        manifest = verify_manifest(read_manifest(store, update_keys(r, member)[1], what), signer, what)
        expect(manifest, what, kind="update", federation_id=spec.federation_id, round=r, member=member)
    except StoreError as e:
        if not isinstance(e, (NotFound, NotRegular)):
            raise
        return False
    except FedcliError:
        return False
    return True


def _bytes_in(store: Store, r: int, members: list[str]) -> int:
    total = 0
    for m in members:
        try:
            total += store.size(update_keys(r, m)[0])
        except FedcliError:  # missing, or a planted link: not counted (aggregate rejects it)
            pass
    return total
