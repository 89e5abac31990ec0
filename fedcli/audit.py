"""`fedcli audit`: verify a federation's whole history offline, for model-risk review.

From the pinned coordinator key it walks every spec version (signatures, links, roster changes,
countersignatures), then every round: the global's signature and spec binding (the version in force
for that round), its tensors' hash, the hash chain to the global before, each contributor's signed
update (signature, round, base model, tensors' hash), the coordinator's signed rejections, and the
epsilon each bank spent according to its own signed DP manifests. It writes audit.json and a
self-contained audit.html (no script): the lineage of the final model, who contributed to each round,
what was refused and why. The first break stops the audit: the files still say what held up to it.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedcli import keys, models
from fedcli.digest import sha256
from fedcli.errors import FedcliError, NotFound, VerificationError
from fedcli.keys import PublicIdentity, verify_manifest
from fedcli.protocol import chain, rounds
from fedcli.protocol.spec import Spec
from fedcli.protocol.tensors import itemsizes, max_file_size
from fedcli.store import Store


@dataclass
class UpdateRecord:
    member: str
    status: str  # contributed, rejected, not used, unverified
    reason: str = ""
    message: str = ""
    tensors_sha256: str = ""
    dp: dict | None = None


@dataclass
class RoundRecord:
    round: int
    spec_version: int
    global_sha256: str
    prev_sha256: str | None
    created_at: str
    rule: str | None
    contributors: list[dict]
    updates: list[UpdateRecord] = field(default_factory=list)
    rejections: str = "none"  # none, verified


@dataclass
class Audit:
    store: str
    federation_id: str = ""
    pinned: str = ""
    versions: list[dict] = field(default_factory=list)
    pending_version: int | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    final_sha256: str = ""
    broken: str = ""  # the first break, or "" when the whole history verifies

    @property
    def lineage(self) -> list[str]:
        return [f"round {r.round}: {r.global_sha256}" for r in reversed(self.rounds) if r.global_sha256]


def audit(store: Store, pinned: PublicIdentity) -> Audit:
    """Everything verified, in order; the first failure is recorded in `broken` (nothing after it is)."""
    result = Audit(str(store), pinned=pinned.fingerprint)
    try:
        walked = chain.walk(store, pinned)
        result.federation_id = walked.latest.spec.federation_id
        result.versions = [_version(v) for v in walked.versions]
        result.pending_version = walked.pending.number if walked.pending else None
        _rounds(store, walked, result)
        result.epsilon = _epsilon(walked, result)
    except FedcliError as e:
        result.broken = str(e)
    return result


def _version(v: chain.Version) -> dict:
    return {
        "version": v.number,
        "spec_sha256": v.sha,
        "effective_round": v.effective_round,
        "coordinator": v.spec.coordinator.fingerprint,
        "members": {m.name: m.fingerprint for m in v.spec.members},
        "changes": [
            {"member": c["member"], "change": c["change"]}
            | {k: keys.fingerprint(keys.unb64(c[k])) for k in ("old_key", "new_key") if k in c}
            for c in v.changes
        ],
        "countersigned_by": list(v.countersigned_by),
        "created_at": v.created_at,
    }


def _spec_at(store: Store, walked: chain.Chain, r: int) -> tuple[Spec, str]:
    """The version in force for round r, its data section filled by federated statistics when the spec has them."""
    from fedcli.protocol.statistics import resolve

    spec, sha = walked.spec_at(r)
    return resolve(store, spec, sha), sha


def _rounds(store: Store, walked: chain.Chain, result: Audit) -> None:
    published = rounds.global_rounds(store)
    if published != list(range(len(published))):
        missing = next(r for r in range(len(published) + 1) if r not in published)
        raise VerificationError(f"round {missing}'s global model is missing (a gap in the history)", reason="missing")
    prev: str | None = None
    for r in published:
        record = _round(store, walked, r, prev)
        result.rounds.append(record)
        result.final_sha256 = prev = record.global_sha256
    last = published[-1] if published else -1
    if rounds.submitted_members(store, last + 1)[0]:  # the open round: what is waiting, and any refusals
        spec, _ = _spec_at(store, walked, last + 1)
        open_round = RoundRecord(last + 1, walked.version_at(last + 1).number, "", prev, "", None, [])
        _updates(store, spec, open_round, set())
        result.rounds.append(open_round)


def _round(store: Store, walked: chain.Chain, r: int, prev: str | None) -> RoundRecord:
    spec, sha = _spec_at(store, walked, r)
    manifest = rounds.global_manifest(store, spec, sha, r)  # signature, contract, place, spec version
    what = f"global model of round {r}"
    shapes = models.shapes(spec.model, spec.data.n_features)
    _check_hash(store, rounds.global_keys(r)[0], manifest["tensors_sha256"], max_file_size(shapes), what)
    if manifest["prev_sha256"] != prev:
        raise VerificationError(f"{what} does not chain to the global model of round {r - 1}", reason="rollback")
    if manifest.get("server_state_sha256"):
        size = 3 * max_file_size(shapes) + 1024
        _check_hash(store, rounds.server_state_key(r), manifest["server_state_sha256"], size, f"{what}'s server state")
    record = RoundRecord(
        r,
        walked.version_at(r).number,
        manifest["tensors_sha256"],
        prev,
        manifest["created_at"],
        manifest.get("rule"),
        [
            {"member": c["member"], "update_round": c.get("update_round", r), "num_examples": c["num_examples"]}
            for c in manifest["contributors"]
        ],
    )
    used = {(c["update_round"], c["member"]) for c in record.contributors}
    for u, member in sorted(used):
        _contribution(store, walked, u, member, r)
    if r:
        _updates(store, spec, record, {m for u, m in used if u == r})
    return record


def _contribution(store: Store, walked: chain.Chain, u: int, member: str, r: int) -> None:
    """A contributor's update: signed by it for round u, trained on global u-1, tensors as signed."""
    spec, spec_sha = _spec_at(store, walked, u)
    signer = spec.member(member)
    what = f"round {r}: contribution of {member} (round {u})"
    if signer is None:
        raise VerificationError(f"{what}: {member} is not a member under spec version {walked.version_at(u).number}")
    from fedcli.contract import validate
    from fedcli.protocol.documents import UpdateManifest

    try:
        raw = rounds.read_manifest(store, rounds.update_keys(u, member)[1], what)
    except NotFound:
        raise VerificationError(f"{what}: its update manifest is missing", reason="missing") from None
    m = validate(UpdateManifest, verify_manifest(raw, signer, what), what)
    rounds.expect(m, what, kind="update", federation_id=spec.federation_id, round=u, member=member)
    base = rounds.global_manifest(store, *_spec_at(store, walked, u - 1), u - 1)
    if m.base_sha256 != base["tensors_sha256"]:
        raise VerificationError(
            f"{what}: trained on another model than the global of round {u - 1}", reason="stale-base"
        )
    if m.spec_sha256 not in (None, spec_sha):
        raise VerificationError(f"{what}: made under another spec version than round {u}'s", reason="wrong-round")
    shapes = models.shapes(spec.model, spec.data.n_features)
    _check_hash(
        store, rounds.update_keys(u, member)[0], m.tensors_sha256, max_file_size(shapes, itemsizes(shapes)), what
    )


def _updates(store: Store, spec: Spec, record: RoundRecord, contributed: set[str]) -> None:
    """Every update file of the round with what became of it (coordinator's signed rejections)."""
    found = rounds.load_rejections(store, spec, record.round)
    if found is not None and not found.verified:
        raise VerificationError(f"rejections of round {record.round}: {found.problem}")
    rejected = found.entries if found else {}
    record.rejections = "verified" if found else "none"
    committed, _ = rounds.submitted_members(store, record.round)
    for member in sorted(set(committed) | set(rejected)):
        entry = UpdateRecord(member, "contributed" if member in contributed else "not used")
        if member in rejected:
            entry.status, entry.reason, entry.message = (
                "rejected",
                rejected[member]["reason"],
                rejected[member]["message"],
            )
        manifest = _signed_update(store, spec, record.round, member)
        if manifest is None:
            entry.status = entry.status if member in rejected else "unverified"
        else:
            entry.tensors_sha256 = manifest.tensors_sha256
            entry.dp = manifest.dp.model_dump(exclude_none=True) if manifest.dp else None
        record.updates.append(entry)


def _signed_update(store: Store, spec: Spec, r: int, member: str):
    from fedcli.contract import validate
    from fedcli.protocol.documents import UpdateManifest

    signer = spec.member(member)
    if signer is None:
        return None
    what = f"update from {member}"
    try:
        m = validate(
            UpdateManifest,
            verify_manifest(rounds.read_manifest(store, rounds.update_keys(r, member)[1], what), signer, what),
            what,
        )
        rounds.expect(m, what, kind="update", federation_id=spec.federation_id, round=r, member=member)
    except FedcliError:
        return None
    return m


def _check_hash(store: Store, key: str, expected: str, bound: int, what: str) -> None:
    try:
        data = store.get(key, max_bytes=bound)
    except NotFound:
        raise VerificationError(f"{what}: {key} is missing", reason="missing") from None
    if sha256(data) != expected:
        raise VerificationError(f"{what}: {key} does not match the sha256 its signed manifest names", reason="bad-hash")


def _epsilon(walked: chain.Chain, result: Audit) -> dict[str, float]:
    """Epsilon each bank spent by its own signed DP releases (every one it published, used or not)."""
    from fedcli.privacy import accounting

    released: dict[str, list] = {}
    delta = walked.latest.spec.privacy.delta
    for record in result.rounds:
        for u in record.updates:
            if u.dp is not None:
                released.setdefault(u.member, []).append(accounting.Mechanism.from_dict(u.dp))
    try:
        return {m: round(accounting.epsilon(mech, delta), 6) for m, mech in sorted(released.items())}
    except (ArithmeticError, ValueError) as e:  # signed, in range, yet not accountable: say so
        raise VerificationError(
            f"the signed DP parameters cannot be accounted for ({e})", reason="weak-privacy"
        ) from None


# --------------------------------------------------------------------------- output


def to_json(a: Audit) -> bytes:
    doc = asdict(a) | {"lineage": a.lineage, "verified": not a.broken}
    return json.dumps(doc, indent=2, sort_keys=False).encode()


def _rows(n: int) -> str:
    return f"{n:,} rows" if n else "rows withheld (DP)"


def _e(value) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(a: Audit) -> bytes:
    verdict = (
        f'<p class="bad">BROKEN: {_e(a.broken)}</p>'
        if a.broken
        else '<p class="ok">The whole history verifies under the pinned coordinator key.</p>'
    )
    versions = _table(
        ["version", "from round", "coordinator", "members", "changes", "countersigned by", "sha256"],
        [
            [
                v["version"],
                v["effective_round"],
                v["coordinator"],
                ", ".join(v["members"]),
                "; ".join(f"{c['change']} {c['member']}" for c in v["changes"]),
                ", ".join(v["countersigned_by"]),
                v["spec_sha256"],
            ]
            for v in a.versions
        ],
    )
    rounds_ = _table(
        ["round", "spec version", "global sha256", "rule", "contributors", "published"],
        [
            [
                r.round,
                r.spec_version,
                r.global_sha256 or "(open)",
                r.rule or "",
                ", ".join(f"{c['member']} ({_rows(c['num_examples'])})" for c in r.contributors),
                r.created_at,
            ]
            for r in a.rounds
        ],
    )
    updates = _table(
        ["round", "member", "status", "reason", "message"],
        [[r.round, u.member, u.status, u.reason, u.message] for r in a.rounds for u in r.updates],
    )
    eps = (
        _table(["bank", "epsilon spent"], [[m, f"{e:.4g}"] for m, e in a.epsilon.items()])
        if a.epsilon
        else "<p>no DP releases</p>"
    )
    checked = (
        "<p>Checked: every spec version's signature (by the coordinator key of the version before, and by the "
        "new key when it rotates), its link to the version before, its spec file's sha256, its roster changes "
        "and countersignatures; every global's signature under the version in force for its round, its spec "
        "binding, its tensors' sha256 and its link to the global before; every contribution's signature by its "
        "member, its round, the model it was trained on and its tensors' sha256; the coordinator's signed "
        "rejections. The privacy budget is composed from each bank's own signed DP parameters.</p>"
    )
    lineage = "<ol>" + "".join(f"<li>{_e(x)}</li>" for x in a.lineage) + "</ol>"
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #999;padding:3px 6px;font-size:90%}.bad{color:#b00;font-weight:bold}"
        ".ok{color:#070;font-weight:bold}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>fedcli audit {_e(a.federation_id)}</title>"
        f"<style>{style}</style></head><body><h1>Audit of federation {_e(a.federation_id)}</h1>"
        f"<p>store {_e(a.store)}; pinned coordinator key {_e(a.pinned)}</p>{verdict}{checked}"
        f"<h2>Final model</h2><p>{_e(a.final_sha256)}</p><h2>Lineage (newest first)</h2>{lineage}"
        f"<h2>Spec versions</h2>{versions}<h2>Rounds</h2>{rounds_}<h2>Updates and refusals</h2>{updates}"
        f"<h2>Privacy budget spent (from signed DP manifests)</h2>{eps}</body></html>"
    )
    return page.encode()


def write(a: Audit, out: Path) -> tuple[Path, Path]:
    from fedcli.files import write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "audit.json", out / "audit.html"
    write_atomic(paths[0], to_json(a), ".audit-")
    write_atomic(paths[1], to_html(a), ".audit-")
    return paths
