"""t-of-n shares of a bank's pairwise-mask seeds, so any t survivors can remove a dropped member's masks.

Why: a survivor's update carries the pairwise mask it shares with every other member. When member d
drops, the masks the survivors share with d no longer cancel and must be removed. If only each survivor
itself could reveal its seed with d, one survivor that vanishes after submitting would stall the round.
So each bank deals, with its update, Shamir t-of-n shares of every pairwise seed it holds this round
(n - 1 seeds, one share of each per member, all of a member's shares sealed to it in one box); any t
survivors then reveal their shares of the seeds (survivor, d) and the coordinator rebuilds them,
checking each against the survivor's signed commitment.

Sharing is pycryptodome's Shamir (a maintained implementation; it shares 16-byte secrets in GF(2**128)),
applied to the two halves of each 32-byte seed, so a member's share of one seed is 32 bytes. It runs in
pure Python: dealing n - 1 seeds costs a bank a few ms at 5 banks and about 0.8 s at 50
(docs/benchmarks.md). The file is bound to federation, round, dealer, recipient and base global as
sharing.py's boxes are.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcli.errors import FedcliError, VerificationError
from fedcli.secagg import sharing

ELEMENT_BYTES = 32  # one share of each 16-byte half of a seed
_HALF = 16
SEED_BYTES = 32
_NONCE, _TAG = 12, 16
_LABEL = b"pair-mask-share"


def box_bytes(n_members: int) -> int:
    """Bytes of one recipient's box: nonce, one share per seed of the dealer (n - 1), tag."""
    return _NONCE + ELEMENT_BYTES * (n_members - 1) + _TAG


def file_bytes(n_members: int) -> int:
    """Bytes of a dealer's pair-shares file: one box per member, in sorted roster order."""
    return n_members * box_bytes(n_members)


def x_of(member: str, members: Sequence[str]) -> int:
    """A member's evaluation point: 1 + its position in the sorted roster (never 0, the secret)."""
    return 1 + sorted(members).index(member)


def split(seed: bytes, threshold: int, n: int) -> list[bytes]:
    """Shamir shares of a 32-byte seed at x = 1..n: each half shared t-of-n by pycryptodome, the halves' shares joined."""
    from Crypto.Protocol.SecretSharing import Shamir  # pycryptodome

    if len(seed) != SEED_BYTES:
        raise FedcliError("a shared pairwise seed is 32 bytes")
    if not 2 <= threshold <= n:
        raise FedcliError(f"cannot share {threshold}-of-{n}")
    low, high = (Shamir.split(threshold, n, seed[i : i + _HALF]) for i in (0, _HALF))
    return [a + b for (_, a), (_, b) in zip(low, high, strict=True)]  # pycryptodome's points are x = 1..n


def combine(points: Sequence[tuple[int, bytes]]) -> bytes:
    """The 32-byte seed from (x, share) points; the caller checks it against its commitment."""
    from Crypto.Protocol.SecretSharing import Shamir  # pycryptodome

    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or any(not 0 < x < 2**16 for x in xs):
        raise VerificationError("share points must be distinct and non-zero", reason="secagg")
    low = Shamir.combine([(x, y[:_HALF]) for x, y in points])
    high = Shamir.combine([(x, y[_HALF:]) for x, y in points])
    return low + high


def encode_element(y: bytes) -> bytes:
    return y


def decode_element(data: bytes) -> bytes:
    if len(data) != ELEMENT_BYTES:
        raise VerificationError("a revealed pairwise share has the wrong length", reason="secagg")
    return data


def _context(federation: str, round_: int, dealer: str, recipient: str, base_sha: str) -> bytes:
    return sharing.field(_LABEL) + sharing.share_context(federation, round_, dealer, recipient, base_sha)


def deal(
    seeds: Mapping[str, bytes],
    threshold: int,
    federation: str,
    round_: int,
    me: str,
    my_key: X25519PrivateKey,
    roster: Mapping[str, X25519PublicKey],
    base_sha: str,
) -> bytes:
    """Share each of my pairwise seeds (peer -> 32 bytes) t-of-n; one sealed box per member, concatenated."""
    members = sorted(roster)
    peers = [m for m in members if m != me]
    if sorted(seeds) != peers:
        raise FedcliError("pairwise seeds must cover exactly the other members")
    columns = [split(seeds[p], threshold, len(members)) for p in peers]
    out = []
    for i, member in enumerate(members):
        plain = b"".join(encode_element(col[i]) for col in columns)
        context = _context(federation, round_, me, member, base_sha)
        nonce = secrets.token_bytes(_NONCE)
        out.append(nonce + sharing.aead(my_key, roster[member], context).encrypt(nonce, plain, context))
    return b"".join(out)


def open_box(
    data: bytes,
    federation: str,
    round_: int,
    dealer: str,
    me: str,
    my_key: X25519PrivateKey,
    roster: Mapping[str, X25519PublicKey],
    base_sha: str,
) -> dict[str, bytes]:
    """My shares (peer -> 32 bytes) of every pairwise seed `dealer` holds, from its pair-shares file."""
    members = sorted(roster)
    n, size = len(members), box_bytes(len(members))
    if len(data) != file_bytes(n):
        raise VerificationError(f"the pair-shares file of {dealer} has the wrong size", reason="secagg")
    i = members.index(me)
    box = data[i * size : (i + 1) * size]
    context = _context(federation, round_, dealer, me, base_sha)
    try:
        plain = sharing.aead(my_key, roster[dealer], context).decrypt(box[:_NONCE], box[_NONCE:], context)
    except InvalidTag:
        raise VerificationError(
            f"the pairwise-seed shares {dealer} sealed to {me} do not decrypt for this federation, round, "
            "base model and pair",
            reason="secagg",
        ) from None
    peers = [m for m in members if m != dealer]
    return {p: plain[k * ELEMENT_BYTES : (k + 1) * ELEMENT_BYTES] for k, p in enumerate(peers)}
