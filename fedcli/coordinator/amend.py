"""Publishing version K+1 of the spec (`fedcli spec amend`), and a member's part in it
(`fedcli spec rotate-key`, `fedcli spec countersign`). The documents and the walk are in protocol.chain.

Every check runs before the first write; the spec file is written first and the link last with a
create-only write, so the link is the commit marker and two amend runs cannot both publish K+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcli import keys, models
from fedcli.contract import load_toml
from fedcli.digest import sha256
from fedcli.errors import AlreadyExists, FedcliError, InputError, VerificationError
from fedcli.protocol import chain, chain_position, rounds
from fedcli.protocol.spec import MAX_SPEC_BYTES, dumps, parse, read_template
from fedcli.store import Store


@dataclass
class Amendment:
    version: chain.Version
    pending: bool  # awaits countersignatures before it is in force


def amend(
    store: Store,
    key_path: Path,
    template: Path | None,
    effective_round: int | None = None,
    add: list[Path] | None = None,
    remove: list[str] | None = None,
    new_key: Path | None = None,
) -> Amendment:
    """Publish version K+1 signed by version K's coordinator (and by `new_key` when it rotates)."""
    walked = chain.walk(store, None)
    if walked.pending is not None:
        raise FedcliError(
            f"version {walked.pending.number} still awaits countersignatures "
            f"({len(walked.pending.countersigned_by)} of {walked.latest.spec.roster_countersign}): "
            "amend again once it is in force"
        )
    latest = walked.latest
    private, pub = keys.load_private(key_path)
    if pub != latest.spec.coordinator.ed25519:
        raise VerificationError(f"{key_path} is not the coordinator key of spec version {latest.number}")
    chain_position.hold(walked, chain_position.coordinator_position_path(key_path))  # never fork a rolled-back chain
    new_private, new_pub = keys.load_private(new_key) if new_key is not None else (None, None)
    raw = _new_raw(latest, template, add or [], remove or [], new_key, new_pub)
    what = f"spec version {latest.number + 1}"
    spec = parse(raw, what, InputError)
    old = latest.spec
    if models.shapes(spec.model, spec.data.n_features) != models.shapes(old.model, old.data.n_features):
        raise InputError(
            f"{what}: the model's shape changes (model kind, hidden layers or features): the published "
            "globals cannot train it; start a new federation with `fedcli init`"
        )
    data = dumps(raw)
    if sha256(data) == latest.sha:
        raise InputError(f"{what} would be identical to version {latest.number}: nothing to amend")
    rotations = [r for r in (_rotation(store, latest, m) for m in spec.members) if r is not None]
    try:
        changes = chain.roster_changes(latest.spec, spec, rotations)
    except FedcliError as e:
        raise InputError(f"{what}: {e}") from None
    when = _effective_round(store, latest, effective_round)
    body = {
        "kind": "spec-version",
        "format": 1,
        "federation_id": spec.federation_id,
        "version": latest.number + 1,
        "prev_spec_sha256": latest.sha,
        "spec_sha256": sha256(data),
        "effective_round": when,
        "changes": changes,
        "rotations": rotations,
        "created_at": rounds.now(),
    }
    v = latest.number + 1
    store.put(chain.spec_key(v), data)
    try:
        store.put(chain.link_key(v), chain.sign_link(body, private, new_private), create_only=True)
    except AlreadyExists:
        raise FedcliError(f"spec version {v} was published meanwhile: check `fedcli spec show` and retry") from None
    version = chain.Version(v, spec, sha256(data), when, tuple(changes))
    pending = latest.spec.roster_countersign > 0 and chain.roster_changed(version)
    if not pending:
        for k in (key_path, new_key) if new_key is not None else (key_path,):
            chain_position.record(chain_position.coordinator_position_path(k), spec.federation_id, v, version.sha)
    return Amendment(version, pending)


def _new_raw(latest: chain.Version, template, add, remove, new_key, new_pub) -> dict:
    """The new spec's table: the file given (else the current version), with the id, coordinator and roster filled in."""
    base = latest.spec.raw
    if template is not None:
        raw = load_toml(read_template(template), f"spec file {template}", MAX_SPEC_BYTES)
    else:
        raw = load_toml(dumps(base), "current spec", MAX_SPEC_BYTES)
    fed = raw.setdefault("federation", {})
    if not isinstance(fed, dict):
        raise InputError("spec file: 'federation' must be a table")
    if fed.setdefault("id", latest.spec.federation_id) != latest.spec.federation_id:
        raise InputError(f"spec file: [federation] id must stay {latest.spec.federation_id!r}")
    if new_key is not None:
        fed["coordinator"] = {"name": Path(new_key).stem, "ed25519": new_pub}
    else:
        fed.setdefault("coordinator", dict(base["federation"]["coordinator"]))
        if fed["coordinator"] != base["federation"]["coordinator"]:
            raise InputError("spec file: a new coordinator key is given with --new-key (it signs the new version too)")
    members = raw.get("members") or [dict(m) for m in base["members"]]
    if not isinstance(members, list):
        raise InputError("spec file: 'members' must be a list of tables")
    unknown = [name for name in remove if not any(isinstance(m, dict) and m.get("name") == name for m in members)]
    if unknown:
        raise InputError(f"--remove {unknown[0]}: no member of that name in the new spec")
    members = [m for m in members if not (isinstance(m, dict) and m.get("name") in remove)]
    for p in add:
        ident = keys.load_public(p)
        entry = {"name": ident.name, "ed25519": ident.ed25519} | ({"x25519": ident.x25519} if ident.x25519 else {})
        old = next((m for m in members if isinstance(m, dict) and m.get("name") == ident.name), None)
        if old is not None:  # a new key for a member: its other settings stay
            old.update(entry)
            if not ident.x25519:
                old.pop("x25519", None)
        else:
            members.append(entry)
    raw["members"] = members
    return raw


def _rotation(store: Store, latest: chain.Version, member) -> dict | None:
    old = latest.spec.member(member.name)
    if old is None or old.ed25519 == member.ed25519:
        return None
    return chain.read_rotation(store, latest.spec, member.name, member.ed25519)


def _effective_round(store: Store, latest: chain.Version, asked: int | None) -> int:
    """From which round it applies: never a published round; by default the open one, or the one
    after it when banks already submitted updates to the open round under the current version."""
    published = rounds.global_rounds(store)
    last = published[-1] if published else 0
    if asked is None:
        committed, pending = rounds.submitted_members(store, last + 1)
        asked = last + 2 if committed or pending else last + 1
    if asked <= last:
        raise InputError(f"--effective-round {asked}: round {last} is already published; use {last + 1} or later")
    if asked < latest.effective_round:
        raise InputError(
            f"--effective-round {asked}: version {latest.number} applies from round {latest.effective_round}"
        )
    return asked


def rotate_key(store: Store, key_path: Path, new_pub: Path) -> str:
    """A member's statement, signed by its current key, that its key becomes new_pub's: the coordinator's
    next amend with that .pub carries it (a key change without one is a roster change)."""
    walked = chain.walk(store, None)
    spec = walked.latest.spec
    private, pub = keys.load_private(key_path)
    me = spec.member_by_key(pub)
    if me is None:
        raise InputError(f"{key_path} is not a member's key in spec version {walked.latest.number}")
    new = keys.load_public(new_pub)
    if new.name != me.name:
        raise InputError(f"{new_pub} is named {new.name!r}; a rotated key keeps the member's name {me.name!r}")
    if spec.member_by_key(new.ed25519) is not None or new.ed25519 == spec.coordinator.ed25519:
        raise InputError(f"{new_pub} is already a key of this federation")
    key = chain.rotation_key(me.name, new.ed25519)
    store.put(key, chain.rotation_statement(private, spec.federation_id, me.name, me.ed25519, new.ed25519))
    return key


def countersign(store: Store, key_path: Path, version: int | None) -> chain.Version:
    """A member of version K-1 countersigns pending version K's roster change."""
    walked = chain.walk(store, None)
    target = walked.pending
    if target is None or (version is not None and version != target.number):
        raise InputError(
            f"no version {'' if version is None else f'{version} '}awaits countersignatures "
            f"(version {walked.latest.number} is in force)"
        )
    private, pub = keys.load_private(key_path)
    prev = walked.latest
    me = prev.spec.member_by_key(pub)
    if me is None:
        raise InputError(f"{key_path} is not a member's key in version {prev.number}: only its members countersign")
    store.put(
        chain.countersign_key(target.number, me.name),
        chain.countersign_doc(private, prev.spec.federation_id, me.name, target),
    )
    return target
