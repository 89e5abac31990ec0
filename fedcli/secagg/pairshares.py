"""t-of-n shares of a bank's pairwise-mask seeds, so any t survivors can remove a dropped member's masks.

Why: a survivor's update carries the pairwise mask it shares with every other member. When member d
drops, the masks the survivors share with d no longer cancel and must be removed. If only each survivor
itself could reveal its seed with d, one survivor that vanishes after submitting would stall the round.
So each bank deals, with its update, Shamir t-of-n shares of every pairwise seed it holds this round
(n - 1 seeds, one share of each per member, all of a member's shares sealed to it in one box); any t
survivors then reveal their shares of the seeds (survivor, d) and the coordinator rebuilds them,
checking each against the survivor's signed commitment.

Sharing is over the prime field GF(2**256 + 297) (the smallest prime above 2**256, so a 32-byte seed is
one field element); pycryptodome's Shamir shares 16-byte secrets in GF(2**128) in pure Python at ~8 ms
per 25-of-50 split, which for n - 1 seeds of two halves each would cost ~0.8 s per bank at 50 banks;
here the polynomial evaluation is a few big-integer multiply-adds per share (docs/benchmarks.md).
The file is bound to federation, round, dealer, recipient and base global as sharing.py's boxes are.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcli.errors import FedcliError, VerificationError
from fedcli.secagg import sharing

PRIME = 2**256 + 297
ELEMENT_BYTES = 33  # a field element, big-endian
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


def split(secret: int, threshold: int, n: int) -> list[int]:
    """Shamir shares of one field element at x = 1..n (a random polynomial of degree threshold - 1)."""
    if not 0 <= secret < PRIME:
        raise FedcliError("a shared secret must be a field element")
    if not 2 <= threshold <= n:
        raise FedcliError(f"cannot share {threshold}-of-{n}")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out.append(y)
    return out


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Weights w_i with f(0) = sum w_i f(x_i) for any polynomial of degree < len(xs)."""
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise VerificationError("share points must be distinct and non-zero", reason="secagg")
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return weights


def combine(points: Sequence[tuple[int, int]]) -> bytes:
    """The 32-byte seed from (x, share) points; the caller checks it against its commitment."""
    weights = lagrange_at_zero([x for x, _ in points])
    secret = sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME
    if secret >= 2 ** (8 * SEED_BYTES):
        raise VerificationError("revealed pairwise shares rebuild no 32-byte seed", reason="secagg")
    return secret.to_bytes(SEED_BYTES, "big")


def encode_element(y: int) -> bytes:
    return y.to_bytes(ELEMENT_BYTES, "big")


def decode_element(data: bytes) -> int:
    if len(data) != ELEMENT_BYTES:
        raise VerificationError("a revealed pairwise share has the wrong length", reason="secagg")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise VerificationError("a revealed pairwise share is not a field element", reason="secagg")
    return y


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
    columns = [split(int.from_bytes(seeds[p], "big"), threshold, len(members)) for p in peers]
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
    """My shares (peer -> 33 bytes) of every pairwise seed `dealer` holds, from its pair-shares file."""
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
