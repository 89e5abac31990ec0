"""t-of-n sharing of a bank's self-mask seed, each share encrypted to its recipient.

Why: with a self mask on every update, the coordinator can unmask only what t survivors agree
to reveal; a bank whose upload was cut short, or that the coordinator hides and declares
dropped, keeps its self mask, because no honest survivor reveals a share of a dropped member's
seed. Shamir's scheme is pycryptodome's (16-byte secrets, GF(2^128)); the encryption is X25519 +
HKDF-SHA256 + ChaCha20-Poly1305 from `cryptography`.

Each share is encrypted under a key only its dealer and its recipient can derive (their static
X25519 keys, through HKDF bound to federation, round, dealer, recipient and the base global's
sha256), with a fresh random nonce, and the same context as associated data: a share moved to
another round, base model, dealer or recipient does not decrypt.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcli.errors import FedcliError, VerificationError
from fedcli.names import check_name
from fedcli.secagg.masking import SELF_SEED_BYTES

_SALT = b"fedcli secagg shares v1"
_NONCE = 12
SHARE_BYTES = 2 + SELF_SEED_BYTES  # big-endian index, then the 16-byte share
SEALED_BYTES = _NONCE + SHARE_BYTES + 16  # nonce, ciphertext, Poly1305 tag


def field(data: bytes) -> bytes:
    """Length-prefixed bytes: no two contexts encode the same."""
    return struct.pack(">I", len(data)) + data


def share_context(federation: str, round_: int, dealer: str, recipient: str, base_sha: str) -> bytes:
    """What a share is bound to (HKDF info and AEAD associated data), every part length-prefixed."""
    for name in (dealer, recipient):
        check_name(name, "member id")
    return b"".join(
        [
            field(b"self-mask-share"),
            field(federation.encode()),
            struct.pack(">Q", round_),
            field(dealer.encode()),
            field(recipient.encode()),
            field(base_sha.encode()),
        ]
    )


def aead(my_key: X25519PrivateKey, peer: X25519PublicKey, context: bytes) -> ChaCha20Poly1305:
    try:
        shared = my_key.exchange(peer)
    except ValueError:
        raise FedcliError("an X25519 key in the roster is invalid (low-order point)") from None
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=context).derive(shared)
    return ChaCha20Poly1305(key)


def split(seed: bytes, threshold: int, members: Sequence[str]) -> dict[str, bytes]:
    """Shamir t-of-n shares of a 16-byte seed, one per member (index = 1 + position in sorted roster)."""
    from Crypto.Protocol.SecretSharing import Shamir  # pycryptodome

    order = sorted(members)
    if not 2 <= threshold <= len(order):
        raise FedcliError(f"cannot share {threshold}-of-{len(order)}")
    shares = Shamir.split(threshold, len(order), seed)
    return {m: struct.pack(">H", idx) + share for m, (idx, share) in zip(order, shares, strict=True)}


def combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """The seed from `threshold` shares (each as `split` produced it); the caller checks its commitment."""
    from Crypto.Protocol.SecretSharing import Shamir  # pycryptodome

    picked = []
    for share in shares[:threshold]:
        if len(share) != SHARE_BYTES:
            raise VerificationError("a revealed self-mask share has the wrong length", reason="secagg")
        picked.append((struct.unpack(">H", share[:2])[0], share[2:]))
    if len(picked) < threshold or len({i for i, _ in picked}) != len(picked):
        raise VerificationError(f"need {threshold} distinct shares to rebuild a self-mask seed", reason="secagg")
    return Shamir.combine(picked)


def seal(share: bytes, my_key: X25519PrivateKey, recipient_key: X25519PublicKey, context: bytes, nonce: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(share) under the dealer-recipient key for this context."""
    if len(nonce) != _NONCE:
        raise FedcliError("a share nonce must be 12 bytes")
    return nonce + aead(my_key, recipient_key, context).encrypt(nonce, share, context)


def open_sealed(sealed: bytes, my_key: X25519PrivateKey, dealer_key: X25519PublicKey, context: bytes) -> bytes:
    """The share sealed to me; a share that does not decrypt under this context is refused."""
    if len(sealed) != SEALED_BYTES:
        raise VerificationError("an encrypted self-mask share has the wrong length", reason="secagg")
    try:
        share = aead(my_key, dealer_key, context).decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
    except InvalidTag:
        raise VerificationError(
            "an encrypted self-mask share does not decrypt for this federation, round, base model and pair",
            reason="secagg",
        ) from None
    return share


def deal(
    seed: bytes,
    threshold: int,
    federation: str,
    round_: int,
    me: str,
    my_key: X25519PrivateKey,
    roster: Mapping[str, X25519PublicKey],
    base_sha: str,
) -> dict[str, bytes]:
    """Split my self-mask seed t-of-n and seal each share to its member (me included)."""
    out = {}
    for member, share in split(seed, threshold, list(roster)).items():
        context = share_context(federation, round_, me, member, base_sha)
        out[member] = seal(share, my_key, roster[member], context, secrets.token_bytes(_NONCE))
    return out
