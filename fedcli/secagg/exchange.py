"""Secure aggregation's part of the round protocol: masked updates and the dropout exchange.

    rounds/00000N/updates/<member>.safetensors      masked uint32 tensors (same names and shapes)
    rounds/00000N/updates/<member>.json             manifest with a "secagg" record: clip, scale,
                                                    a SHA-256 commitment to each pairwise seed
    rounds/00000N/secagg/drops.json                 coordinator: who survived, who dropped (signed)
    rounds/00000N/secagg/recovery/<member>.json     survivor: its seeds with the dropped (signed)

The drop declaration is create-only and final: a member it lists as dropped never gets an
update accepted for that round (train refuses to write one, aggregate rejects one), because
with the revealed seeds the coordinator could unmask it; and a survivor refuses to reveal
anything while a dropped member's update is on the store. The maths is in masking.py; the
coordinator folds masked updates in through SecureSum, its aggregator (aggregation.aggregators).
"""

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedcli import keys
from fedcli.contract import validate
from fedcli.digest import sha256
from fedcli.errors import AlreadyExists, FedcliError, NotFound, NotRegular, StoreError, VerificationError
from fedcli.protocol import rounds
from fedcli.protocol.documents import DropDeclaration, RecoveryShares, UpdateManifest
from fedcli.protocol.spec import Spec
from fedcli.secagg import masking

DROPS_KIND = "secagg-drops"
RECOVERY_KIND = "secagg-recovery"
RULE = "secagg-mean"  # the rule the global manifest names


def _secagg(message: str) -> VerificationError:
    return VerificationError(message, reason="secagg")


def _enrolled(spec: Spec, name: str) -> keys.PublicIdentity:
    """The signing identity of a member a drop declaration names (check_recovery made sure it is enrolled)."""
    ident = spec.member(name)
    if ident is None:
        raise _secagg(f"{name!r} is not an enrolled member")
    return ident


def drops_key(r: int) -> str:
    return f"{rounds.round_dir(r)}/secagg/drops.json"


def recovery_key(r: int, member: str) -> str:
    return f"{rounds.round_dir(r)}/secagg/recovery/{member}.json"


def roster(spec: Spec) -> dict:
    return {m.name: m.mask_key() for m in spec.members}


def scale(spec: Spec) -> float:
    return masking.fixed_point_scale(spec.secagg.clip, len(spec.members))


def min_survivors(spec: Spec) -> int:
    return max(2, spec.min_clients)


def member_noise(spec: Spec, noise_multiplier: float) -> float:
    """Update-level DP noise multiplier this bank applies (see masking.member_noise_multiplier)."""
    return masking.member_noise_multiplier(noise_multiplier, spec.secagg.noise, min_survivors(spec))


# --- bank side ---------------------------------------------------------------------------


def mask_delta(spec: Spec, r: int, me: str, mask_key, delta: dict) -> tuple[dict, dict, int]:
    """Clip, quantize and mask a delta; return (uint32 tensors, manifest record, coordinates clipped)."""
    flat, layout = masking.flatten(delta)
    clip, sc = spec.secagg.clip, scale(spec)
    clipped = int(np.count_nonzero(np.abs(flat) > clip))
    seeds = masking.pair_seeds(spec.federation_id, r, me, mask_key, roster(spec))
    masked = masking.apply_masks(masking.quantize(flat, clip, sc), me, seeds)
    record = {
        "clip": clip,
        "scale": sc,
        "noise": spec.secagg.noise,
        "commitments": {peer: masking.seed_commitment(seed) for peer, seed in seeds.items()},
    }
    return masking.unflatten(masked, layout), record, clipped


@dataclass
class Drops:
    survivors: dict[str, str]  # member -> tensors_sha256 of its update
    dropped: list[str]
    sha256: str  # of the declaration file, which recovery shares name
    created_at: str


def load_drops(store, spec: Spec, r: int) -> Drops | None:
    """The verified drop declaration of round r, or None if the coordinator made none."""
    what = f"drop declaration of round {r}"
    try:
        data = rounds.read_manifest(store, drops_key(r), what)
    except NotFound:
        return None
    doc = validate(DropDeclaration, keys.verify_manifest(data, spec.coordinator, what), what)
    rounds.expect(doc, what, kind=DROPS_KIND, federation_id=spec.federation_id, round=r)
    try:
        masking.check_recovery(
            [m.name for m in spec.members], dict(doc.survivors), list(doc.dropped), min_survivors(spec)
        )
    except FedcliError as e:
        raise VerificationError(f"{what}: {e}", reason="secagg") from None
    return Drops(dict(doc.survivors), sorted(doc.dropped), sha256(data), doc.created_at)


def _orphan_recovery(store, r: int) -> None:
    """Recovery shares without their declaration mean someone deleted it: nothing is safe then."""
    if store.list(f"{rounds.round_dir(r)}/secagg"):
        raise VerificationError(
            f"round {r} holds secure-aggregation recovery files but no drop declaration (deleted?): refusing to go on"
        )


def refuse_if_dropped(store, spec: Spec, r: int, me: str) -> None:
    """A member declared dropped must not publish its update: it could be unmasked."""
    drops = load_drops(store, spec, r)
    if drops is None:
        _orphan_recovery(store, r)
    elif me not in drops.survivors:
        raise FedcliError(
            f"{me} was declared dropped from round {r} by the coordinator ({drops.created_at}): "
            f"an update now would never be accepted and could be unmasked; wait for round {r + 1}"
        )


def publish_recovery(store, spec: Spec, r: int, me: str, private, mask_key) -> str | None:
    """If round r has a drop declaration, reveal my seeds with the dropped members (signed).

    Returns a message, or None when there is no declaration (nothing to do).
    """
    drops = load_drops(store, spec, r)
    if drops is None:
        return None
    if me not in drops.survivors:
        raise FedcliError(f"{me} is declared dropped from round {r}: it has nothing to reveal")
    if store.exists(recovery_key(r, me)):
        return _own_recovery(store, spec, r, me, drops)
    what = f"own update of {me}"
    mine = keys.verify_manifest(
        rounds.read_manifest(store, rounds.update_keys(r, me)[1], what), _enrolled(spec, me), what
    )
    if drops.survivors[me] != mine.get("tensors_sha256"):
        raise VerificationError(f"drop declaration of round {r} names another update of {me} than the one it submitted")
    late = genuine_updates(store, spec, r, drops.dropped)
    if late:  # safety over liveness: one survivor refusing keeps a mask on the late update
        raise VerificationError(
            f"refusing to reveal seeds: {', '.join(late)} is declared dropped from round {r} but its update is on the "
            f"store, and the seeds would unmask it; the coordinator should delete rounds/{r:06d}/secagg/ so the "
            "round completes with everyone in"
        )
    seeds = masking.recovery_seeds(spec.federation_id, r, me, mask_key, roster(spec), drops.dropped)
    doc = {
        "kind": RECOVERY_KIND,
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "member": me,
        "drops_sha256": drops.sha256,
        "seeds": {d: base64.b64encode(s).decode("ascii") for d, s in seeds.items()},
        "created_at": rounds.now(),
    }
    try:
        store.put(recovery_key(r, me), keys.sign_manifest(private, doc), create_only=True)
    except AlreadyExists:
        return _own_recovery(store, spec, r, me, drops)
    return f"published recovery shares for round {r} (masks shared with {', '.join(drops.dropped)})"


def _own_recovery(store, spec: Spec, r: int, me: str, drops: Drops) -> str:
    """Recovery shares under my name count as published only if my key signed them for this declaration.

    Otherwise a planted file would make this bank wait forever, believing it had published.
    """
    key, what, signer = recovery_key(r, me), f"recovery shares of {me}", _enrolled(spec, me)
    try:
        doc = keys.verify_manifest(rounds.read_manifest(store, key, what), signer, what)
        rounds.expect(
            doc,
            what,
            kind=RECOVERY_KIND,
            federation_id=spec.federation_id,
            round=r,
            member=me,
            drops_sha256=drops.sha256,
        )
    except NotFound:
        raise StoreError(f"{key} vanished while being checked; run again") from None
    except FedcliError as e:
        if isinstance(e, StoreError) and not isinstance(e, NotRegular):
            raise
        raise VerificationError(
            f"recovery shares for {me} that this key did not sign for this round sit at {key}; "
            "ask the coordinator to remove it",
            reason="bad-signature",
        ) from None
    return f"{me} already published its recovery shares for round {r}; waiting for the coordinator"


# --- coordinator side ----------------------------------------------------------------------


def genuine_updates(store, spec: Spec, r: int, members) -> list[str]:
    """Members with a genuine (signed by them, for this round) masked update on the store, valid
    or not: revealing the seeds shared with such a member would let the coordinator unmask it."""
    genuine = []
    for m in members:
        ident = spec.member(m)
        if ident is None or not store.exists(rounds.update_keys(r, m)[1]):
            continue
        try:
            doc = keys.verify_manifest(rounds.read_manifest(store, rounds.update_keys(r, m)[1], m), ident, m)
        except FedcliError:
            continue
        if doc.get("round") == r and doc.get("federation_id") == spec.federation_id:
            genuine.append(m)
    return genuine


def declare_drops(store, private, spec: Spec, r: int, survivors: dict[str, str]) -> Drops:
    """Write the final, signed drop declaration: survivors' update hashes and the dropped rest."""
    dropped = sorted(m.name for m in spec.members if m.name not in survivors)
    masking.check_recovery([m.name for m in spec.members], survivors, dropped, min_survivors(spec))
    doc = {
        "kind": DROPS_KIND,
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "survivors": dict(sorted(survivors.items())),
        "dropped": dropped,
        "created_at": rounds.now(),
    }
    try:
        store.put(drops_key(r), keys.sign_manifest(private, doc), create_only=True)
    except AlreadyExists:
        pass  # another aggregate run declared first; use the one on the store
    drops = load_drops(store, spec, r)
    if drops is None:
        raise StoreError(f"{drops_key(r)} vanished right after it was written; run again")
    return drops


def load_recoveries(store, spec: Spec, r: int, drops: Drops, commitments: dict) -> tuple[dict, list[str]]:
    """Verified revealed seeds {(survivor, dropped): seed}, and the survivors still to publish."""
    revealed, missing = {}, []
    for s in sorted(drops.survivors):
        what = f"recovery shares of {s}"
        try:
            data = rounds.read_manifest(store, recovery_key(r, s), what)
        except NotFound:
            missing.append(s)
            continue
        doc = validate(RecoveryShares, keys.verify_manifest(data, _enrolled(spec, s), what), what)
        rounds.expect(
            doc,
            what,
            kind=RECOVERY_KIND,
            federation_id=spec.federation_id,
            round=r,
            member=s,
            drops_sha256=drops.sha256,
        )
        if sorted(doc.seeds) != drops.dropped:
            raise _secagg(f"{what}: seeds do not cover exactly the dropped members")
        for d, text in doc.seeds.items():
            try:
                seed = keys.unb64(text, f"{what}: seed for {d}")
            except FedcliError as e:
                raise _secagg(str(e)) from None
            if len(seed) != 32 or masking.seed_commitment(seed) != commitments[s].get(d):
                raise _secagg(f"{what}: seed for {d} does not match {s}'s signed commitment")
            revealed[(s, d)] = seed
    return revealed, missing


class SecureSum:
    """The "secagg" aggregator: a running mod-2**32 sum of masked updates, closed by the dropout exchange.

    All members in: the masks cancel. Quorum without everyone: declare the missing dropped and
    wait for the survivors' recovery shares. Declaration and all shares in: unmask the sum.
    """

    def __init__(self, store, private, spec: Spec, r: int, shapes: Mapping[str, tuple[int, ...]]):
        self.store, self.private, self.spec, self.round = store, private, spec, r
        self.drops = load_drops(store, spec, r)
        self.layout = [(k, tuple(shapes[k])) for k in sorted(shapes)]
        self.total = np.zeros(sum(int(np.prod(s)) for _, s in self.layout), dtype=np.uint32)
        self.commitments: dict[str, dict] = {}  # member -> {peer: seed commitment}
        self.shas: dict[str, str] = {}  # member -> tensors_sha256

    def check(self, member: str, manifest: UpdateManifest) -> None:
        """Refuse an update that is not a proper member of this round's masked sum (reason secagg)."""
        what, drops = f"update from {member}", self.drops
        if drops is not None and member not in drops.survivors:
            raise _secagg(
                f"{what}: {member} was declared dropped from this round before its update arrived; "
                "a late update is never accepted"
            )
        rec = manifest.secagg
        if rec is None:
            raise _secagg(f"{what}: not masked (secure aggregation is enabled)")
        if rec.clip != self.spec.secagg.clip or rec.scale != scale(self.spec):
            raise _secagg(f"{what}: fixed-point clip/scale differ from the spec's")
        if rec.noise != self.spec.secagg.noise:
            raise _secagg(f"{what}: declares {rec.noise!r} DP noise, the spec says {self.spec.secagg.noise!r}")
        peers = sorted(m.name for m in self.spec.members if m.name != member)
        if sorted(rec.commitments) != peers:
            raise _secagg(f"{what}: seed commitments do not cover exactly the other members")
        if drops is not None and drops.survivors[member] != manifest.tensors_sha256:
            raise _secagg(f"{what}: differs from the update named in the drop declaration")

    def add(
        self, label: str, manifest: UpdateManifest | None, delta: Mapping, weight: float = 1.0, staleness: int = 0
    ) -> dict:
        """Add a checked update's masked words (every survivor counts the same: the mean is unweighted)."""
        if manifest is None or manifest.secagg is None:
            raise FedcliError("a masked update needs its checked manifest")
        flat = np.concatenate([np.asarray(delta[k], dtype=np.uint32).reshape(-1) for k, _ in self.layout])
        np.add(self.total, flat, out=self.total)
        self.commitments[manifest.member] = dict(manifest.secagg.commitments)
        self.shas[manifest.member] = manifest.tensors_sha256
        return {}

    def result(self, readiness: tuple[bool, str], rejected: Sequence[str] = ()) -> tuple[dict | None, str, dict]:
        """(mean delta or None, waiting reason, manifest info): what the masked round needs next."""
        if self.drops is None:
            return self._close_undeclared(readiness, rejected)
        return self._close_declared(self.drops)

    def close(self) -> None:
        """Nothing to free: the sum lives in memory."""

    def _mean(self, revealed: dict) -> dict:
        """Unmask with the revealed seeds and return the mean delta (float64 tensors)."""
        survivors = sorted(self.commitments)
        unmasked = masking.unmask_sum(self.total, survivors, revealed)
        flat = masking.dequantize(unmasked, scale(self.spec)) / len(survivors)
        return masking.unflatten(flat, self.layout)

    def _close_undeclared(self, readiness: tuple[bool, str], rejected: Sequence[str]) -> tuple[dict | None, str, dict]:
        """No drop declaration yet: everyone in closes the round, quorum declares the rest dropped."""
        store, spec, r = self.store, self.spec, self.round
        _orphan_recovery(store, r)
        if set(self.commitments) == {m.name for m in spec.members}:
            return self._mean({}), "", {"rule": RULE, "secagg": {"dropped": [], "scale": scale(spec)}}
        ready, reason = readiness
        if not ready:
            return None, reason, {}
        genuine = genuine_updates(store, spec, r, rejected)
        if genuine:
            raise VerificationError(
                f"round {r}: the signed update of {', '.join(genuine)} was rejected; declaring it dropped would "
                "let the coordinator unmask it, so remove that update (the bank then re-submits) before aggregating"
            )
        drops = declare_drops(store, self.private, spec, r, dict(self.shas))
        return (
            None,
            (
                f"declared {', '.join(drops.dropped)} dropped from round {r}; waiting for recovery shares from "
                f"{', '.join(sorted(drops.survivors))} (each publishes them on its next `fedcli train`)"
            ),
            {},
        )

    def _close_declared(self, drops: Drops) -> tuple[dict | None, str, dict]:
        """A drop declaration stands: unmask once every survivor's recovery shares are in."""
        r = self.round
        lost = sorted(set(drops.survivors) - set(self.commitments))
        if lost:
            raise VerificationError(
                f"round {r}: {', '.join(lost)} survived the drop declaration but has no valid update; the round cannot complete"
            )
        revealed, missing = load_recoveries(self.store, self.spec, r, drops, self.commitments)
        if missing:
            return None, f"recovery shares of round {r} still missing from {', '.join(missing)}", {}
        secagg = {"dropped": drops.dropped, "drops_sha256": drops.sha256, "scale": scale(self.spec)}
        return self._mean(revealed), "", {"rule": RULE, "secagg": secagg}
