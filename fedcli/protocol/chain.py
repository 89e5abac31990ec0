"""The spec as a chain of signed versions (as TUF does for its root metadata).

    federation.toml, federation.toml.sig           version 1, as `fedcli init` writes it
    specs/00000K/federation.toml                   version K >= 2
    specs/00000K/link.json                         its link: signed by the coordinator of version K-1
                                                   (and by the new coordinator when the key rotates)
    specs/00000K/countersign/<member>.json         a member of version K-1 agrees to K's roster change
    specs/rotations/<member>/<fp>.json             a member's key rotation, signed by its old key

A version says from which round it applies (`effective_round`): members join or leave at a round
boundary. Round r is played under the newest complete version whose effective round is <= r; a
version whose roster change lacks the countersignatures version K-1 requires
(`[federation] roster_countersign`) is pending: it and everything after it are not in force yet.
Anyone walks the chain from version 1 and refuses gaps, a wrong link, a bad signature, a version
number going back, a changed federation id. Forks (another version K than one already seen) are
caught by the bank's own record of the versions it trusted (bank.pinning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from fedcli import keys
from fedcli.digest import sha256
from fedcli.errors import ContractError, FedcliError, NotFound, VerificationError, Waiting
from fedcli.keys import PublicIdentity
from fedcli.protocol.documents import Document, Name, Sha256, Timestamp
from fedcli.protocol.spec import MAX_SIG_BYTES, MAX_SPEC_BYTES, Spec, verified

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcli.store import Store

SPEC_KEY = "federation.toml"  # version 1 (rounds.SPEC_KEY)
SPEC_SIG_KEY = "federation.toml.sig"
LINK_DOMAIN = b"fedcli-spec-link-v1\n"
MAX_LINK_BYTES = 256 * 1024
MAX_VERSION = 999_999
CHAIN = "rollback"  # the reason code of a broken chain: the store shows a history that does not hold


def spec_key(v: int) -> str:
    return SPEC_KEY if v == 1 else f"specs/{v:06d}/federation.toml"


def link_key(v: int) -> str:
    return f"specs/{v:06d}/link.json"


def countersign_dir(v: int) -> str:
    return f"specs/{v:06d}/countersign"


def countersign_key(v: int, member: str) -> str:
    return f"{countersign_dir(v)}/{member}.json"


def key_id(ed25519_b64: str) -> str:
    """A short, path-safe name of a public key (hex of the first 64 bits of its SHA-256)."""
    return sha256(keys.unb64(ed25519_b64))[:16]


def rotation_key(member: str, new_ed25519: str) -> str:
    return f"specs/rotations/{member}/{key_id(new_ed25519)}.json"


# --------------------------------------------------------------------------- documents


VersionNumber = Annotated[int, Field(ge=2, le=MAX_VERSION)]
Key = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
Sig = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")]


class Change(Document):
    """One roster change between two versions."""

    member: Name
    change: Literal["join", "leave", "rotate", "replace"]
    old_key: Key | None = None
    new_key: Key | None = None


class KeyRotation(Document):
    """A member's statement, signed by its old key, that its key becomes new_ed25519."""

    kind: Literal["key-rotation"]
    format: Literal[1]
    federation_id: Name
    member: Name
    old_ed25519: Key
    new_ed25519: Key
    created_at: Timestamp


class SignedRotation(KeyRotation):
    signature: Sig


class SpecLink(Document):
    """specs/00000K/link.json: binds version K to version K-1 and says from which round it applies."""

    kind: Literal["spec-version"]
    format: Literal[1]
    federation_id: Name
    version: VersionNumber
    prev_spec_sha256: Sha256
    spec_sha256: Sha256
    effective_round: Annotated[int, Field(ge=1, le=999_999)]
    changes: Annotated[list[Change], Field(max_length=2000)]
    rotations: Annotated[list[SignedRotation], Field(max_length=1000)]
    created_at: Timestamp
    signatures: Annotated[dict[Literal["previous", "next"], Sig], Field(min_length=1, max_length=2)]


class Countersign(Document):
    """A member of version K-1 agrees to version K (its roster change)."""

    kind: Literal["spec-countersign"]
    format: Literal[1]
    federation_id: Name
    version: VersionNumber
    spec_sha256: Sha256
    member: Name
    created_at: Timestamp


# --------------------------------------------------------------------------- the chain as read


@dataclass(frozen=True)
class Version:
    number: int
    spec: Spec
    sha: str  # sha256 of the spec bytes
    effective_round: int  # the first round played under it
    changes: tuple[dict, ...] = ()  # roster changes from the version before
    countersigned_by: tuple[str, ...] = ()
    created_at: str = ""


@dataclass
class Chain:
    """Every complete version, oldest first; `pending` is the first version awaiting countersignatures."""

    versions: list[Version]
    pending: Version | None = None

    @property
    def latest(self) -> Version:
        return self.versions[-1]

    def version_at(self, r: int) -> Version:
        """The version in force for round r: the newest whose effective round is <= r."""
        found = self.versions[0]
        for v in self.versions:
            if v.effective_round <= r:
                found = v
        return found

    def spec_at(self, r: int) -> tuple[Spec, str]:  # the Spec carries this chain
        v = self.version_at(r)
        return replace(v.spec, chain=self), v.sha

    def version(self, number: int) -> Version | None:
        return self.versions[number - 1] if 1 <= number <= len(self.versions) else None


def in_force(spec: Spec, spec_sha: str | None, r: int) -> tuple[Spec, str | None]:
    """The spec and its sha for round r: from the chain the spec was read with, else the spec itself.

    The same version is the spec itself (with its data section as federated statistics filled it,
    protocol.statistics); another version still waiting for statistics takes the ones `spec` has.
    """
    chain = getattr(spec, "chain", None)
    if not isinstance(chain, Chain):
        return spec, spec_sha
    other, other_sha = chain.spec_at(r)
    if other_sha == spec_sha:
        return spec, spec_sha
    if other.data.statistics == "federated" and other.statistics_sha256 is None and spec.statistics_sha256:
        other = replace(other, data=spec.data, statistics_sha256=spec.statistics_sha256)
    return other, other_sha


def gate(spec: Spec, r: int) -> None:
    """Round r cannot be played while a version that applies to it awaits countersignatures: its
    updates and global would be made under a version that is about to stop being the one in force."""
    walked = spec.chain
    pending = walked.pending if isinstance(walked, Chain) else None
    if pending is not None and r >= pending.effective_round:
        raise Waiting(
            f"spec version {pending.number} awaits countersignatures ({len(pending.countersigned_by)} of "
            f"{walked.latest.spec.roster_countersign}) before round {pending.effective_round} can be played: "
            "members run `fedcli spec countersign`"
        )


def walk(store: Store, pinned: PublicIdentity | None) -> Chain:
    """Read and verify every version from 1; with `pinned`, some version must name that key.

    Version 1 verifies under the key it names, each later one under the key of the version before
    (and of its own when it rotates), so every version is signed by the key it names: a bank
    enrolled after a rotation pins the new key. With no later version, `pinned` is checked before
    anything is parsed, exactly as before the chain existed.
    """
    try:
        data = store.get(SPEC_KEY, max_bytes=MAX_SPEC_BYTES)
        sig = store.get(SPEC_SIG_KEY, max_bytes=MAX_SIG_BYTES)
    except NotFound:
        raise FedcliError(f"{store} holds no federation: run `fedcli init` first") from None
    numbers = _link_numbers(store)
    if pinned is not None and not numbers:  # no chain: exactly today's check
        return Chain([Version(1, verified(data, sig, pinned), sha256(data), 0)])
    first = Version(1, verified(data, sig, None), sha256(data), 0)
    chain = Chain([first])
    for v in numbers:
        step = _next_version(store, chain.latest, v)
        if _awaits_countersign(chain.latest, step):
            chain.pending = step
            break
        chain.versions.append(step)
    if pinned is not None and not any(v.spec.coordinator.ed25519 == pinned.ed25519 for v in chain.versions):
        raise VerificationError(
            f"federation spec: no version of it is signed with the pinned coordinator key {pinned.fingerprint}: "
            "refusing to trust this store (another federation's, or tampered)"
        )
    return chain


def _link_numbers(store: Store) -> list[int]:
    """Version numbers with a link on the store: 2, 3, ... with no gap."""
    found = sorted(
        int(m.group(1)) for key in store.list("specs") if (m := re.fullmatch(r"specs/(\d{6})/link\.json", key))
    )
    for expected, got in enumerate(found, start=2):
        if got != expected:
            raise VerificationError(
                f"federation spec chain: version {expected} is missing before version {got} (a gap): "
                "refusing to trust this store",
                reason=CHAIN,
            )
    return found


def _next_version(store: Store, prev: Version, v: int) -> Version:
    """Version v, verified against version v-1 (signature, link, federation, rounds, key statements)."""
    from fedcli.contract import load_json, validate
    from fedcli.protocol.spec import loads

    what = f"federation spec version {v}"
    raw = load_json(_get(store, link_key(v), MAX_LINK_BYTES, what), what, MAX_LINK_BYTES)
    if not isinstance(raw, dict) or not isinstance(raw.get("signatures"), dict):
        raise VerificationError(f"{what}: its link carries no signatures", reason=CHAIN)
    signatures = raw.pop("signatures")
    body = _signed_body(raw, what)
    _verify_sig(body, signatures.get("previous"), prev.spec.coordinator, what, "the coordinator of the version before")
    link = validate(SpecLink, {**raw, "signatures": signatures}, what)
    _expect_link(link, prev, v, what)
    data = _get(store, spec_key(v), MAX_SPEC_BYTES, what)
    if sha256(data) != link.spec_sha256:
        raise VerificationError(f"{what}: the spec file does not match the sha256 its link signs", reason="bad-hash")
    spec = loads(data, what, ContractError)
    if spec.federation_id != prev.spec.federation_id:
        raise VerificationError(f"{what}: names federation {spec.federation_id!r}, not {prev.spec.federation_id!r}")
    if spec.coordinator.ed25519 != prev.spec.coordinator.ed25519:
        _verify_sig(body, signatures.get("next"), spec.coordinator, what, "the new coordinator key")
    changes = roster_changes(prev.spec, spec, [r.model_dump() for r in link.rotations])
    if [c for c in changes] != [c.model_dump(exclude_none=True) for c in link.changes]:
        raise VerificationError(f"{what}: the roster changes its link lists are not the spec's", reason=CHAIN)
    version = Version(v, spec, link.spec_sha256, link.effective_round, tuple(changes), (), link.created_at)
    if prev.spec.roster_countersign == 0 or not roster_changed(version):
        return version
    return replace(version, countersigned_by=tuple(countersigners(store, prev, version)))


def _expect_link(link, prev: Version, v: int, what: str) -> None:
    if link.version != v:
        raise VerificationError(f"{what}: its link says version {link.version}", reason=CHAIN)
    if link.federation_id != prev.spec.federation_id:
        raise VerificationError(f"{what}: its link names federation {link.federation_id!r}", reason="wrong-round")
    if link.prev_spec_sha256 != prev.sha:
        raise VerificationError(
            f"{what} does not chain to version {prev.number} (a fork or a replaced version)", reason=CHAIN
        )
    if link.effective_round < prev.effective_round:
        raise VerificationError(
            f"{what} applies from round {link.effective_round}, before version {prev.number} "
            f"(round {prev.effective_round}): rounds never go back",
            reason=CHAIN,
        )


def _get(store: Store, key: str, max_bytes: int, what: str) -> bytes:
    try:
        return store.get(key, max_bytes=max_bytes)
    except NotFound:
        raise VerificationError(f"{what}: {key} is missing", reason="missing") from None


def _signed_body(doc: dict, what: str) -> bytes:
    try:
        return keys.canonical(doc)
    except ValueError:
        raise ContractError(f"{what}: holds a number too large to be finite", reason="not-finite") from None


def _verify_sig(body: bytes, sig, signer: PublicIdentity, what: str, who: str) -> None:
    if not isinstance(sig, str):
        raise VerificationError(f"{what}: its link is not signed by {who} ({signer.fingerprint})")
    try:
        keys.verify_bytes(body, sig, signer, what, domain=LINK_DOMAIN)
    except VerificationError:
        raise VerificationError(
            f"{what}: its link's signature does not verify with {who} ({signer.fingerprint})"
        ) from None


# --------------------------------------------------------------------------- roster changes


def roster_changes(old: Spec, new: Spec, rotations: list[dict]) -> list[dict]:
    """join / leave / rotate (a key change its old key signed) / replace (a key change without one)."""
    rotated = {(r["member"], r["old_ed25519"], r["new_ed25519"]) for r in rotations}
    for r in rotations:
        _check_rotation(r, old)
    before, after = {m.name: m for m in old.members}, {m.name: m for m in new.members}
    changes: list[dict] = []
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        if a is None and b is not None:
            changes.append({"member": name, "change": "join", "new_key": b.ed25519})
        elif b is None and a is not None:
            changes.append({"member": name, "change": "leave", "old_key": a.ed25519})
        elif a is not None and b is not None and a.ed25519 != b.ed25519:
            kind = "rotate" if (name, a.ed25519, b.ed25519) in rotated else "replace"
            changes.append({"member": name, "change": kind, "old_key": a.ed25519, "new_key": b.ed25519})
    used = {(c["member"], c.get("old_key"), c.get("new_key")) for c in changes if c["change"] == "rotate"}
    if len(used) != len(rotations):
        raise VerificationError("a key rotation statement does not match a key change of the roster", reason=CHAIN)
    return changes


def _check_rotation(statement: dict, old: Spec) -> None:
    """A rotation statement is signed by the member's key in the version before."""
    from fedcli.contract import validate

    what = f"key rotation of {statement.get('member')!r}"
    member = old.member(str(statement.get("member")))
    if member is None or member.ed25519 != statement.get("old_ed25519"):
        raise VerificationError(f"{what}: the old key is not that member's key in the version before", reason=CHAIN)
    body = {k: v for k, v in statement.items() if k != "signature"}
    keys.verify_manifest(_signed_body(statement, what), member, what)
    validate(KeyRotation, body, what)
    if statement["federation_id"] != old.federation_id:
        raise VerificationError(f"{what}: names another federation", reason="wrong-round")


def roster_changed(version: Version) -> bool:
    return any(c["change"] != "rotate" for c in version.changes)


def _awaits_countersign(prev: Version, version: Version) -> bool:
    need = prev.spec.roster_countersign
    return need > 0 and roster_changed(version) and len(version.countersigned_by) < need


def countersigners(store: Store, prev: Version, version: Version) -> list[str]:
    """Members of the version before whose countersignature of this version verifies (others are ignored)."""
    from fedcli.contract import validate

    present = set(store.list(countersign_dir(version.number)))
    found = []
    for m in prev.spec.members:
        if countersign_key(version.number, m.name) not in present:
            continue
        what = f"countersignature of version {version.number} by {m.name}"
        try:
            doc = keys.verify_manifest(
                store.get(countersign_key(version.number, m.name), max_bytes=keys.MAX_MANIFEST_BYTES), m, what
            )
            c = validate(Countersign, doc, what)
        except FedcliError:
            continue
        if (c.federation_id, c.version, c.spec_sha256, c.member) == (
            prev.spec.federation_id,
            version.number,
            version.sha,
            m.name,
        ):
            found.append(m.name)
    return found


# --------------------------------------------------------------------------- writing versions


def sign_link(body: dict, previous: Ed25519PrivateKey, new: Ed25519PrivateKey | None) -> bytes:
    """The link file: its body and the signatures over it (previous coordinator; new one when it rotates)."""
    data = keys.canonical(body)
    signatures = {"previous": keys.sign_bytes(previous, data, domain=LINK_DOMAIN)}
    if new is not None:
        signatures["next"] = keys.sign_bytes(new, data, domain=LINK_DOMAIN)
    return keys.canonical({**body, "signatures": signatures})


def rotation_statement(private: Ed25519PrivateKey, federation_id: str, member: str, old: str, new: str) -> bytes:
    doc = {
        "kind": "key-rotation",
        "format": 1,
        "federation_id": federation_id,
        "member": member,
        "old_ed25519": old,
        "new_ed25519": new,
        "created_at": _now(),
    }
    return keys.sign_manifest(private, doc)


def countersign_doc(private: Ed25519PrivateKey, federation_id: str, member: str, version: Version) -> bytes:
    doc = {
        "kind": "spec-countersign",
        "format": 1,
        "federation_id": federation_id,
        "version": version.number,
        "spec_sha256": version.sha,
        "member": member,
        "created_at": _now(),
    }
    return keys.sign_manifest(private, doc)


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def read_rotation(store: Store, spec: Spec, member: str, new_ed25519: str) -> dict | None:
    """The member's signed statement that its key becomes new_ed25519 (None when there is none)."""
    key = rotation_key(member, new_ed25519)
    try:
        data = store.get(key, max_bytes=keys.MAX_MANIFEST_BYTES)
    except NotFound:
        return None
    from fedcli.contract import load_json

    doc = load_json(data, f"key rotation {key}", keys.MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict):
        raise ContractError(f"key rotation {key} is not a JSON object")
    _check_rotation(doc, spec)
    if doc["new_ed25519"] != new_ed25519:
        raise VerificationError(f"key rotation {key} names another new key", reason=CHAIN)
    return doc
