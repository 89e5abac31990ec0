"""Secure aggregation's part of the round protocol: masked updates and the unmasking exchange.

    rounds/00000N/updates/<member>.safetensors      masked uint32 tensors (self mask + pairwise masks)
    rounds/00000N/updates/<member>.json             manifest with a "secagg" record: clip, scale, t,
                                                    commitments to each pairwise seed and to the
                                                    self-mask seed, the seed's t-of-n shares sealed
                                                    to each member, the pair-shares file's sha256
    rounds/00000N/pairshares/<member>.bin           t'-of-n shares of each of its pairwise seeds, one
                                                    sealed box per member (pairshares.py)
    rounds/00000N/secagg/drops.json                 coordinator: the survivor set (with each survivor's
                                                    update hash), the dropped, the base global (signed)
    rounds/00000N/secagg/recovery/<member>.json     survivor: for each survivor its share of that
                                                    survivor's self-mask seed, for each dropped member
                                                    its pairwise seed with it and its share of every
                                                    survivor's seed with it (signed, naming the set)

Every masked round takes two exchanges: the banks submit, the coordinator declares the survivor
set (even when nobody dropped), each survivor reveals on its next `fedcli train`, and the
coordinator unmasks once any t survivors (t' = max(t, n - t + 1) if someone dropped) revealed:
a survivor that vanishes after submitting no longer stalls the round. The declaration is create-only and final; a survivor reveals
nothing for a set below t, for a set that names another base global or another update of its
own, or for a second set of the same round (its local record, reveals.py). A dropped member's
update keeps its self mask, so it stays hidden even if it reaches the store. The maths is in
masking.py and sharing.py; the coordinator folds masked updates in through SecureSum, its
aggregator (aggregation.aggregators), and refuses to publish a sum outside ±n·clip.
"""

import base64
import itertools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcli import keys
from fedcli.contract import validate
from fedcli.digest import sha256
from fedcli.errors import AlreadyExists, FedcliError, NotFound, NotRegular, StoreError, VerificationError
from fedcli.protocol import rounds
from fedcli.protocol.documents import DropDeclaration, RecoveryShares, UpdateManifest
from fedcli.protocol.spec import Spec
from fedcli.secagg import masking, pairshares, reveals, sharing

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


def pair_shares_key(r: int, member: str) -> str:
    """The member's t-of-n shares of its pairwise seeds (outside secagg/, which only the exchange writes)."""
    return f"{rounds.round_dir(r)}/pairshares/{member}.bin"


def roster(spec: Spec) -> dict:
    return {m.name: m.mask_key() for m in spec.members}


def scale(spec: Spec) -> float:
    return masking.fixed_point_scale(spec.secagg.clip, len(spec.members))


def fewest_survivors(spec: Spec) -> int:
    """Fewest survivors a round is unmasked with: the spec's t (never below min_clients)."""
    return max(spec.secagg.threshold, spec.min_clients)


def pair_threshold(spec: Spec) -> int:
    """How many survivors' shares rebuild a pairwise seed: max(t, n - t + 1).

    A coordinator that shows two groups of banks two survivor sets (a forked store, bundles) gets
    a member's self-mask shares from one group and its peers' pairwise-seed shares from the other;
    each bank acts on one set only, so the groups are disjoint. With t + t_pair > n they cannot
    both be large enough. The default t = max(3, n // 2 + 1) already gives t_pair = t.
    """
    t = spec.secagg.threshold
    return max(t, len(spec.members) - t + 1)


def member_noise(spec: Spec, noise_multiplier: float) -> float:
    """Update-level DP noise multiplier this bank applies (see masking.member_noise_multiplier)."""
    return masking.member_noise_multiplier(noise_multiplier, spec.secagg.noise, fewest_survivors(spec))


# --- bank side ---------------------------------------------------------------------------


def mask_delta(spec: Spec, r: int, me: str, mask_key, delta: dict, base_sha: str = "") -> tuple[dict, dict, int, bytes]:
    """Clip, quantize, add pairwise masks and a fresh self mask; deal the self-mask seed and the pairwise seeds t-of-n.

    Returns (uint32 tensors, manifest record, coordinates clipped, pair-shares file). The self-mask
    seed itself is dropped here: only its sealed shares (one per member) and its commitment leave
    the bank; the pairwise seeds leave only as sealed shares (pairshares.py) and commitments.
    """
    flat, layout = masking.flatten(delta)
    clip, sc, t = spec.secagg.clip, scale(spec), spec.secagg.threshold
    clipped = int(np.count_nonzero(np.abs(flat) > clip))
    members = roster(spec)
    seeds = masking.pair_seeds(spec.federation_id, r, me, mask_key, members, base_sha)
    masked = masking.apply_masks(masking.quantize(flat, clip, sc), me, seeds)
    self_seed = secrets.token_bytes(masking.SELF_SEED_BYTES)
    masking.add_self_mask(masked, self_seed)
    sealed = sharing.deal(self_seed, t, spec.federation_id, r, me, mask_key, members, base_sha)
    pair_file = pairshares.deal(seeds, pair_threshold(spec), spec.federation_id, r, me, mask_key, members, base_sha)
    record = {
        "clip": clip,
        "scale": sc,
        "noise": spec.secagg.noise,
        "commitments": {peer: masking.seed_commitment(seed) for peer, seed in seeds.items()},
        "threshold": t,
        "self_commitment": masking.seed_commitment(self_seed),
        "shares": {m: keys.b64(box) for m, box in sorted(sealed.items())},
        "pair_shares_sha256": sha256(pair_file),
    }
    return masking.unflatten(masked, layout), record, clipped, pair_file


def put_pair_shares(store, r: int, me: str, pair_file: bytes) -> None:
    """Upload my pair-shares file before the manifest that names its sha256 (the manifest commits it)."""
    store.put(pair_shares_key(r, me), pair_file)


def read_pair_shares(store, spec: Spec, r: int, member: str, expected_sha: str | None) -> bytes:
    """A member's pair-shares file, read within its exact size and checked against its signed manifest."""
    what = f"pair-shares file of {member}"
    try:
        data = store.get(pair_shares_key(r, member), max_bytes=pairshares.file_bytes(len(spec.members)))
    except (NotFound, NotRegular):  # other store errors (a network glitch) propagate: run again
        raise _secagg(f"{what} is missing from the store (round {r})") from None
    if expected_sha is None or sha256(data) != expected_sha:
        raise _secagg(f"{what} is not the one {member}'s signed manifest names")
    return data


@dataclass
class Drops:
    survivors: dict[str, str]  # member -> tensors_sha256 of its update
    dropped: list[str]
    sha256: str  # of the declaration file, which recovery shares name
    created_at: str
    base_sha256: str = ""  # the global every survivor trained on


def load_drops(store, spec: Spec, r: int) -> Drops | None:
    """The verified survivor set of round r, or None if the coordinator declared none yet."""
    what = f"drop declaration of round {r}"
    try:
        data = rounds.read_manifest(store, drops_key(r), what)
    except NotFound:
        return None
    doc = validate(DropDeclaration, keys.verify_manifest(data, spec.coordinator, what), what)
    rounds.expect(doc, what, kind=DROPS_KIND, federation_id=spec.federation_id, round=r)
    if doc.base_sha256 is None or doc.threshold != spec.secagg.threshold:
        raise _secagg(f"{what}: names no base global or another threshold than the spec's ({spec.secagg.threshold})")
    try:
        masking.check_recovery(
            [m.name for m in spec.members], dict(doc.survivors), list(doc.dropped), fewest_survivors(spec)
        )
    except FedcliError as e:
        raise VerificationError(f"{what}: {e}", reason="secagg") from None
    return Drops(dict(doc.survivors), sorted(doc.dropped), sha256(data), doc.created_at, doc.base_sha256)


def _orphan_recovery(store, r: int) -> None:
    """Recovery shares without their declaration mean someone deleted it: nothing is safe then."""
    if store.list(f"{rounds.round_dir(r)}/secagg"):
        raise VerificationError(
            f"round {r} holds secure-aggregation recovery files but no drop declaration (deleted?): refusing to go on"
        )


def refuse_if_dropped(store, spec: Spec, r: int, me: str) -> None:
    """A member declared dropped must not publish its update: it would never be accepted."""
    drops = load_drops(store, spec, r)
    if drops is None:
        _orphan_recovery(store, r)
    elif me not in drops.survivors:
        raise FedcliError(
            f"{me} was declared dropped from round {r} by the coordinator ({drops.created_at}): "
            f"an update now would never be accepted; wait for round {r + 1}"
        )


def _survivor_manifest(store, spec: Spec, r: int, member: str, drops: Drops) -> UpdateManifest:
    """A survivor's signed update manifest, checked against the declaration (same update, same base)."""
    what = f"update manifest of {member}"
    data = rounds.read_manifest(store, rounds.update_keys(r, member)[1], what)
    doc = validate(UpdateManifest, keys.verify_manifest(data, _enrolled(spec, member), what), what)
    rounds.expect(doc, what, kind="update", federation_id=spec.federation_id, round=r, member=member)
    if doc.tensors_sha256 != drops.survivors[member]:
        raise _secagg(f"the survivor set of round {r} names another update of {member} than the one on the store")
    if doc.base_sha256 != drops.base_sha256:
        raise _secagg(
            f"the survivor set of round {r} names another base global than {member} trained on "
            "(banks shown different globals): nothing is revealed"
        )
    if doc.secagg is None or doc.secagg.shares is None or not covers_roster(doc.secagg.shares, spec):
        raise _secagg(f"{what}: carries no sealed self-mask share for every member")
    if doc.secagg.pair_shares_sha256 is None:
        raise _secagg(f"{what}: names no shares of its pairwise seeds")
    return doc


def covers_roster(shares: Mapping[str, str], spec: Spec) -> bool:
    """A self-mask seed is shared to exactly the enrolled members (no more, none missing)."""
    return sorted(shares) == sorted(m.name for m in spec.members)


def _my_shares(store, spec: Spec, r: int, me: str, mask_key, drops: Drops) -> tuple[dict, dict]:
    """My share of every survivor's self-mask seed (from its signed manifest) and, if someone dropped,
    of every survivor's pairwise seeds with the dropped (from its pair-shares file), base64."""
    members, self_out, pair_out = roster(spec), {}, {}
    for s in sorted(drops.survivors):
        record = _survivor_manifest(store, spec, r, s, drops).secagg
        assert record is not None and record.shares is not None  # _survivor_manifest checked both
        sealed = keys.unb64(record.shares[me], f"{s}'s share for {me}")
        context = sharing.share_context(spec.federation_id, r, s, me, drops.base_sha256)
        try:
            self_out[s] = keys.b64(sharing.open_sealed(sealed, mask_key, members[s], context))
        except VerificationError as e:
            raise _secagg(f"the self-mask share {s} sealed to {me}: {e}") from None
        mine = _my_pair_shares(store, spec, r, (s, me), mask_key, drops, record.pair_shares_sha256)
        if mine is not None:
            pair_out[s] = mine
    return self_out, pair_out


def _my_pair_shares(
    store, spec: Spec, r: int, pair: tuple[str, str], mask_key, drops: Drops, sha: str | None
) -> dict[str, str] | None:
    """My shares of survivor pair[0]'s pairwise seeds with the dropped (base64); None when nobody dropped,
    or when its pair-shares file is missing or altered: withholding a share never unmasks anyone, and
    the round can still finish with that survivor's own seeds or the other banks' shares."""
    if not drops.dropped:
        return None
    dealer, me = pair
    try:
        data = read_pair_shares(store, spec, r, dealer, sha)
        mine = pairshares.open_box(data, spec.federation_id, r, dealer, me, mask_key, roster(spec), drops.base_sha256)
    except VerificationError:
        return None
    return {d: keys.b64(mine[d]) for d in drops.dropped}


def publish_recovery(
    store, spec: Spec, r: int, me: str, private, mask_key, record_path: Path | None = None
) -> str | None:
    """If round r has a survivor set, reveal what unmasks exactly the survivors' sum (signed).

    For each survivor, my share of its self-mask seed; for each dropped member, my pairwise seed
    with it and my share of every survivor's pairwise seed with it; never both kinds for one
    member, never for two sets of one round (record_path).
    Returns a message, or None when there is no declaration (nothing to do).
    """
    drops = load_drops(store, spec, r)
    if drops is None:
        return None
    if me not in drops.survivors:
        raise FedcliError(f"{me} is declared dropped from round {r}: it has nothing to reveal")
    if store.exists(recovery_key(r, me)):
        return _own_recovery(store, spec, r, me, drops)
    _survivor_manifest(store, spec, r, me, drops)  # the set names my update and the base I trained on
    self_shares, pair_shares = _my_shares(store, spec, r, me, mask_key, drops)
    seeds = masking.recovery_seeds(spec.federation_id, r, me, mask_key, roster(spec), drops.dropped, drops.base_sha256)
    if record_path is not None:
        reveals.check_and_record(record_path, spec.federation_id, r, drops.sha256, drops.survivors, drops.dropped)
    doc = {
        "kind": RECOVERY_KIND,
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "member": me,
        "drops_sha256": drops.sha256,
        "seeds": {d: base64.b64encode(s).decode("ascii") for d, s in seeds.items()},
        "self_shares": self_shares,
        "pair_shares": pair_shares,
        "created_at": rounds.now(),
    }
    signed = _sign_within_bound(private, doc)
    try:
        store.put(recovery_key(r, me), signed, create_only=True)
    except AlreadyExists:
        return _own_recovery(store, spec, r, me, drops)
    dropped = f"; pairwise seeds with dropped {', '.join(drops.dropped)}" if drops.dropped else ""
    unreadable = sorted(set(drops.survivors) - set(pair_shares)) if drops.dropped else []
    if unreadable:
        dropped += f"; no shares of the pairwise seeds of {', '.join(unreadable)} (pair-shares file missing or altered, or past the size bound)"
    return f"published recovery shares for round {r} (self-mask shares of {len(self_shares)} survivors{dropped})"


def _sign_within_bound(private, doc: dict) -> bytes:
    """The signed recovery file, within the signed-document bound every reader applies.

    With many survivors and many dropped the pairwise shares (survivors x dropped) may not fit:
    the shares of the last survivors (sorted) are left out until it does. Every bank leaves out
    the same ones, and a survivor's own revealed seeds still close the gap: the round then needs
    those survivors' recovery files, as before pairwise shares existed. Withholding never unmasks.
    """
    signed = keys.sign_manifest(private, doc)
    while len(signed) > keys.MAX_MANIFEST_BYTES and doc["pair_shares"]:
        doc["pair_shares"].pop(max(doc["pair_shares"]))
        signed = keys.sign_manifest(private, doc)
    return signed


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


def declare_drops(store, private, spec: Spec, r: int, survivors: dict[str, str], base_sha: str) -> Drops:
    """Write the final, signed survivor set: survivors' update hashes, the dropped rest, the base global."""
    dropped = sorted(m.name for m in spec.members if m.name not in survivors)
    masking.check_recovery([m.name for m in spec.members], survivors, dropped, fewest_survivors(spec))
    doc = {
        "kind": DROPS_KIND,
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "survivors": dict(sorted(survivors.items())),
        "dropped": dropped,
        "base_sha256": base_sha,
        "threshold": spec.secagg.threshold,
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


@dataclass
class Revealed:
    """What the survivors' recovery files hold so far."""

    pairs: dict[tuple[str, str], bytes]  # (survivor, dropped) -> pairwise seed, revealed by the survivor itself
    shares: dict[str, list[bytes]]  # survivor -> revealed shares of its self-mask seed
    pair_points: dict[tuple[str, str], list[tuple[int, bytes]]]  # (survivor, dropped) -> (x, share) of its seed
    present: list[str]  # survivors whose recovery file is in
    missing: list[str]  # survivors still to publish


def _decode(text: str, what: str) -> bytes:
    try:
        return keys.unb64(text, what)
    except FedcliError as e:
        raise _secagg(str(e)) from None


def _read_recovery(store, spec: Spec, r: int, s: str, drops: Drops) -> RecoveryShares | None:
    what = f"recovery shares of {s}"
    try:
        data = rounds.read_manifest(store, recovery_key(r, s), what)
    except NotFound:
        return None
    doc = validate(RecoveryShares, keys.verify_manifest(data, _enrolled(spec, s), what), what)
    rounds.expect(
        doc, what, kind=RECOVERY_KIND, federation_id=spec.federation_id, round=r, member=s, drops_sha256=drops.sha256
    )
    if sorted(doc.seeds) != drops.dropped or sorted(doc.self_shares) != sorted(drops.survivors):
        raise _secagg(f"{what}: does not cover exactly the dropped members' pairwise seeds and the survivors' shares")
    dealers = set(drops.survivors) if drops.dropped else set()
    if not set(doc.pair_shares) <= dealers or any(sorted(v) != drops.dropped for v in doc.pair_shares.values()):
        raise _secagg(f"{what}: does not hold a share of exactly every survivor's pairwise seed with the dropped")
    return doc


def load_recoveries(store, spec: Spec, r: int, drops: Drops, commitments: dict) -> Revealed:
    """Verified revealed pairwise seeds and self-mask shares, and who has not published yet."""
    out = Revealed({}, {s: [] for s in drops.survivors}, {}, [], [])
    members = [m.name for m in spec.members]
    for s in sorted(drops.survivors):
        doc = _read_recovery(store, spec, r, s, drops)
        if doc is None:
            out.missing.append(s)
            continue
        out.present.append(s)
        for d, text in doc.seeds.items():
            seed = _decode(text, f"recovery shares of {s}: seed for {d}")
            if len(seed) != 32 or masking.seed_commitment(seed) != commitments[s].get(d):
                raise _secagg(f"recovery shares of {s}: seed for {d} does not match {s}'s signed commitment")
            out.pairs[(s, d)] = seed
        for dealer, text in doc.self_shares.items():
            out.shares[dealer].append(_decode(text, f"recovery shares of {s}: share of {dealer}"))
        x = pairshares.x_of(s, members)
        for dealer, by_dropped in doc.pair_shares.items():
            for d, text in by_dropped.items():
                y = _decode(text, f"recovery shares of {s}: share of {dealer}'s seed with {d}")
                try:
                    out.pair_points.setdefault((dealer, d), []).append((x, pairshares.decode_element(y)))
                except VerificationError as e:
                    raise _secagg(f"recovery shares of {s}: {e}") from None
    return out


def rebuild_self_seed(member: str, shares: Sequence[bytes], t: int, commitment: str, tries: int = 64) -> bytes:
    """A survivor's self-mask seed from t of the revealed shares, checked against its signed commitment.

    A wrong share (a dealer that dealt garbage, or a survivor that revealed a wrong one) fails the
    commitment; other t-subsets are tried, a bounded number of times.
    """
    for subset in itertools.islice(itertools.combinations(shares, t), tries):
        seed = sharing.combine(list(subset), t)
        if masking.seed_commitment(seed) == commitment:
            return seed
    raise _secagg(
        f"the revealed shares of {member}'s self-mask seed do not rebuild its signed commitment: {member} dealt bad "
        "shares or a survivor revealed a wrong one; the round cannot be unmasked"
    )


def rebuild_pair_seed(
    pair: tuple[str, str], points: Sequence[tuple[int, bytes]], t: int, commitment: str | None, tries: int = 64
) -> bytes:
    """The pairwise seed a survivor holds with a dropped member, from t revealed shares, checked
    against the survivor's signed commitment (other t-subsets are tried, a bounded number of times)."""
    for subset in itertools.islice(itertools.combinations(points, t), tries):
        try:
            seed = pairshares.combine(list(subset))
        except VerificationError:
            continue
        if masking.seed_commitment(seed) == commitment:
            return seed
    raise _secagg(
        f"the revealed shares of {pair[0]}'s pairwise seed with {pair[1]} do not rebuild its signed commitment: "
        f"{pair[0]} dealt bad shares or a survivor revealed a wrong one; the round cannot be unmasked"
    )


class SecureSum:
    """The "secagg" aggregator: a running mod-2**32 sum of masked updates, closed by the unmasking exchange.

    Quorum (or everyone) in: declare the survivor set and wait for the survivors' recovery files.
    Declaration and enough recovery files in: remove the self masks (t shares each) and the
    pairwise masks left by dropped members, refuse a sum outside ±n·clip, return the mean.
    """

    def __init__(self, store, private, spec: Spec, r: int, shapes: Mapping[str, tuple[int, ...]]):
        self.store, self.private, self.spec, self.round = store, private, spec, r
        self.drops = load_drops(store, spec, r)
        self.layout = [(k, tuple(shapes[k])) for k in sorted(shapes)]
        self.total = np.zeros(sum(int(np.prod(s)) for _, s in self.layout), dtype=np.uint32)
        self.commitments: dict[str, dict] = {}  # member -> {peer: seed commitment}
        self.self_commitments: dict[str, str] = {}  # member -> commitment to its self-mask seed
        self.shas: dict[str, str] = {}  # member -> tensors_sha256
        self.base_sha = ""  # every accepted update was checked against the same base global

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
        if rec.threshold != self.spec.secagg.threshold or rec.self_commitment is None or rec.shares is None:
            raise _secagg(f"{what}: no self mask shared {self.spec.secagg.threshold}-of-n (double masking)")
        if not covers_roster(rec.shares, self.spec):
            raise _secagg(f"{what}: self-mask shares are not sealed to exactly the members")
        if drops is None:  # any t' survivors must be able to remove its pairwise masks: its shares must be in
            read_pair_shares(self.store, self.spec, self.round, member, rec.pair_shares_sha256)
        if drops is not None and drops.survivors[member] != manifest.tensors_sha256:
            raise _secagg(f"{what}: differs from the update named in the drop declaration")

    def add(
        self, label: str, manifest: UpdateManifest | None, delta: Mapping, weight: float = 1.0, staleness: int = 0
    ) -> dict:
        """Add a checked update's masked words (every survivor counts the same: the mean is unweighted)."""
        if manifest is None or manifest.secagg is None or manifest.secagg.self_commitment is None:
            raise FedcliError("a masked update needs its checked manifest")
        flat = np.concatenate([np.asarray(delta[k], dtype=np.uint32).reshape(-1) for k, _ in self.layout])
        np.add(self.total, flat, out=self.total)
        self.commitments[manifest.member] = dict(manifest.secagg.commitments)
        self.self_commitments[manifest.member] = manifest.secagg.self_commitment
        self.shas[manifest.member] = manifest.tensors_sha256
        self.base_sha = manifest.base_sha256
        return {}

    def result(self, readiness: tuple[bool, str], rejected: Sequence[str] = ()) -> tuple[dict | None, str, dict]:
        """(mean delta or None, waiting reason, manifest info): what the masked round needs next."""
        if self.drops is None:
            return self._declare(readiness)
        return self._close_declared(self.drops)

    def close(self) -> None:
        """Nothing to free: the sum lives in memory."""

    def _self_seeds(self, drops: Drops, revealed: Revealed) -> dict[str, bytes] | None:
        """Every survivor's self-mask seed; None while a seed does not rebuild but more shares may still come."""
        t, seeds = self.spec.secagg.threshold, {}
        for s in sorted(drops.survivors):
            try:
                seeds[s] = rebuild_self_seed(s, revealed.shares[s], t, self.self_commitments[s])
            except VerificationError:
                if revealed.missing:  # a wrong share among the first t: wait for the others' shares
                    return None
                raise
        return seeds

    def _pair_seeds(self, drops: Drops, revealed: Revealed) -> dict[tuple[str, str], bytes] | None:
        """Every (survivor, dropped) seed: as the survivor revealed it, else rebuilt from t shares; None to wait."""
        t, out = pair_threshold(self.spec), {}
        for pair in itertools.product(sorted(drops.survivors), drops.dropped):
            if pair in revealed.pairs:
                out[pair] = revealed.pairs[pair]
                continue
            try:
                out[pair] = rebuild_pair_seed(
                    pair, revealed.pair_points.get(pair, []), t, self.commitments[pair[0]].get(pair[1])
                )
            except VerificationError:
                if revealed.missing:  # a wrong share among those in: wait for the others'
                    return None
                raise
        return out

    def _mean(self, drops: Drops, pairs: Mapping[tuple[str, str], bytes], seeds: Mapping[str, bytes]) -> dict:
        """Remove self masks and leftover pairwise masks, check the range, return the mean delta (float64)."""
        survivors = sorted(drops.survivors)
        unmasked = masking.unmask_sum(self.total, survivors, pairs)
        for s in survivors:
            masking.remove_self_mask(unmasked, seeds[s])
        sc = scale(self.spec)
        masking.check_range(unmasked, len(survivors), self.spec.secagg.clip, sc)
        flat = masking.dequantize(unmasked, sc) / len(survivors)
        return masking.unflatten(flat, self.layout)

    def _declare(self, readiness: tuple[bool, str]) -> tuple[dict | None, str, dict]:
        """No survivor set yet: everyone in, or quorum with at least t survivors, declares one."""
        store, spec, r = self.store, self.spec, self.round
        _orphan_recovery(store, r)
        if set(self.commitments) != {m.name for m in spec.members}:
            ready, reason = readiness
            if not ready:
                return None, reason, {}
        need = fewest_survivors(spec)
        if len(self.shas) < need:
            return None, f"{len(self.shas)} masked updates are in; secure aggregation unmasks no fewer than {need}", {}
        drops = declare_drops(store, self.private, spec, r, dict(self.shas), self.base_sha)
        gone = f" ({', '.join(drops.dropped)} dropped)" if drops.dropped else ""
        return (
            None,
            (
                f"declared the survivor set of round {r}{gone}; waiting for recovery shares from "
                f"{', '.join(sorted(drops.survivors))} (each publishes them on its next `fedcli train`)"
            ),
            {},
        )

    def _close_declared(self, drops: Drops) -> tuple[dict | None, str, dict]:
        """A survivor set stands: unmask once t shares per survivor (and all seeds with the dropped) are in."""
        r = self.round
        lost = sorted(set(drops.survivors) - set(self.commitments))
        if lost:
            raise VerificationError(
                f"round {r}: {', '.join(lost)} survived the drop declaration but has no valid update; the round cannot complete"
            )
        revealed = load_recoveries(self.store, self.spec, r, drops, self.commitments)
        need = pair_threshold(self.spec) if drops.dropped else self.spec.secagg.threshold
        if len(revealed.present) < need:  # any `need` survivors unmask; nobody in particular
            return None, f"recovery shares of round {r} still missing from {', '.join(revealed.missing)}", {}
        seeds, pairs = self._self_seeds(drops, revealed), self._pair_seeds(drops, revealed)
        if seeds is None or pairs is None:
            return (
                None,
                f"a self-mask seed of round {r} does not rebuild yet; waiting for {', '.join(revealed.missing)}",
                {},
            )
        secagg = {"dropped": drops.dropped, "drops_sha256": drops.sha256, "scale": scale(self.spec)}
        return self._mean(drops, pairs, seeds), "", {"rule": RULE, "secagg": secagg}
