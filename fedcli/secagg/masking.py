"""Secure aggregation's maths: pairwise masks and self masks (Bonawitz et al. 2017, double masking).

Why: the coordinator must learn only the sum of the banks' updates, never one bank's update, even
when it lies about who dropped out or a bank's upload is cut short.

How, for a fixed roster of members in one round:
- every member has an X25519 key enrolled in the federation spec; each pair (i, j) derives the
  same 32-byte seed from X25519(i, j) with HKDF-SHA256, bound to the federation id, the round,
  the sha256 of the base global, both member ids (in canonical order) and both public keys, so
  seeds of different rounds, federations, pairs or base models are unrelated;
- every member also draws a fresh 16-byte self-mask seed per round (never derived from a key);
  it shares that seed t-of-n with Shamir (sharing.py) so t survivors can remove its self mask;
- a seed keys AES-256-CTR, whose keystream read as little-endian uint32 is the mask;
- an update is clipped to [-clip, clip], scaled to fixed point and stochastically rounded to
  integers modulo 2**32; member i adds its self mask, the mask shared with every j > i and
  subtracts the mask shared with every j < i, so pairwise masks cancel in the sum;
- for each member, a survivor reveals its share of the self-mask seed (member survived) or the
  pairwise seed it shares with it (member dropped), never both: a dropped member's update keeps
  its self mask, a survivor's keeps the masks it shares with honest peers.

Everything here is a pure function over numpy arrays and `cryptography` keys; the file
exchange (who writes what, signatures, refusing late updates) lives in exchange.py.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcli.digest import sha256
from fedcli.errors import FedcliError, VerificationError
from fedcli.names import check_name
from fedcli.randomness import secure_numpy_rng

MODULUS_BITS = 32
HEADROOM_BITS = 8  # a sum with a missing mask lands inside +-n*clip with probability <= 2**-8 per coordinate
SELF_SEED_BYTES = 16  # Shamir (pycryptodome) shares 16-byte secrets; HKDF stretches them to an AES-256 key
_HKDF_SALT = b"fedcli secagg v1"
_NOISE_MODES = ("full", "shared")


# --- pairwise seeds and masks -------------------------------------------------------------


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _pair_info(federation: str, round_: int, a: str, pub_a: bytes, b: str, pub_b: bytes, base_sha: str = "") -> bytes:
    """HKDF info: every input length-prefixed so no two contexts encode the same."""
    return b"".join(
        [
            _field(b"pairwise-mask"),
            _field(federation.encode()),
            struct.pack(">Q", round_),
            _field(base_sha.encode()),
            _field(a.encode()),
            _field(pub_a),
            _field(b.encode()),
            _field(pub_b),
        ]
    )


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_seed(
    federation: str,
    round_: int,
    me: str,
    my_key: X25519PrivateKey,
    peer: str,
    peer_public: X25519PublicKey,
    base_sha: str = "",
) -> bytes:
    """The 32-byte seed that `me` and `peer` both derive for this federation, round and base global.

    Two banks shown different base globals (base_sha) derive unrelated seeds: their masks do not
    cancel and the sum is noise, which the range check refuses, instead of a leak.

    The X25519 secret never leaves this function; only the HKDF output (one round, one pair)
    is ever used or revealed, so revealing it tells nothing about other rounds or pairs.
    """
    check_name(federation, "federation id")
    check_name(me, "member id")
    check_name(peer, "member id")
    if me == peer:
        raise FedcliError(f"member {me!r} cannot share a mask with itself")
    if not isinstance(round_, int) or round_ < 0:
        raise FedcliError(f"invalid round {round_!r}")
    my_pub = _raw(my_key.public_key())
    peer_pub = _raw(peer_public)
    if my_pub == peer_pub:
        raise FedcliError(f"members {me!r} and {peer!r} enrolled the same X25519 key")
    try:
        shared = my_key.exchange(peer_public)
    except ValueError:
        raise FedcliError(f"X25519 key of {peer!r} is invalid (low-order point)") from None
    (a, pa), (b, pb) = sorted([(me, my_pub), (peer, peer_pub)])
    info = _pair_info(federation, round_, a, pa, b, pb, base_sha)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=info).derive(shared)


def seed_commitment(seed: bytes) -> str:
    """SHA-256 of a seed (hex): a member commits to its seeds in its signed manifest so a
    revealed seed can be checked; a hash of a 256-bit random secret reveals nothing about it."""
    return sha256(b"fedcli secagg seed commitment\x00" + seed)


def expand_mask(seed: bytes, n: int) -> np.ndarray:
    """n uint32 values from AES-256-CTR keyed by the seed (the keystream is the mask).

    Each seed keys exactly one stream, so the fixed zero counter block is never reused
    under the same key.
    """
    if len(seed) != 32:
        raise FedcliError("a mask seed must be 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(4 * n)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def self_mask_key(seed: bytes) -> bytes:
    """The AES-256 key of a self mask, stretched from its 16-byte shared seed."""
    if len(seed) != SELF_SEED_BYTES:
        raise FedcliError(f"a self-mask seed must be {SELF_SEED_BYTES} bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=b"self-mask").derive(seed)


def add_self_mask(acc: np.ndarray, seed: bytes) -> None:
    """acc += PRG(seed) (mod 2**32), in place."""
    _apply(acc, self_mask_key(seed), 1)


def remove_self_mask(acc: np.ndarray, seed: bytes) -> None:
    """acc -= PRG(seed) (mod 2**32), in place."""
    _apply(acc, self_mask_key(seed), -1)


def _sign(me: str, peer: str) -> int:
    """+1 if me adds the pair's mask, -1 if it subtracts it (canonical id order)."""
    return 1 if me < peer else -1


def _apply(acc: np.ndarray, seed: bytes, sign: int) -> None:
    mask = expand_mask(seed, acc.size)
    if sign > 0:
        np.add(acc, mask, out=acc)
    else:
        np.subtract(acc, mask, out=acc)


def pair_seeds(
    federation: str,
    round_: int,
    me: str,
    my_key: X25519PrivateKey,
    roster: Mapping[str, X25519PublicKey],
    base_sha: str = "",
) -> dict[str, bytes]:
    """The seed `me` shares with every other member of the round's roster.

    roster maps every member id (me included) to its enrolled X25519 public key.
    """
    _check_roster(roster, me)
    if _raw(roster[me]) != _raw(my_key.public_key()):
        raise FedcliError(f"the X25519 key of {me!r} does not match the one enrolled in the spec")
    return {
        peer: pair_seed(federation, round_, me, my_key, peer, roster[peer], base_sha)
        for peer in sorted(roster)
        if peer != me
    }


def apply_masks(quantized: np.ndarray, me: str, seeds: Mapping[str, bytes]) -> np.ndarray:
    """quantized + sum of signed pairwise masks (mod 2**32), as a new flat uint32 vector."""
    out = np.array(quantized, dtype=np.uint32, copy=True).reshape(-1)
    for peer in sorted(seeds):
        _apply(out, seeds[peer], _sign(me, peer))
    return out


def mask_update(
    quantized: np.ndarray,
    federation: str,
    round_: int,
    me: str,
    my_key: X25519PrivateKey,
    roster: Mapping[str, X25519PublicKey],
) -> np.ndarray:
    """quantized + sum of pairwise masks (mod 2**32), for the fixed roster of this round."""
    return apply_masks(quantized, me, pair_seeds(federation, round_, me, my_key, roster))


def _check_roster(roster: Mapping[str, X25519PublicKey], me: str | None = None) -> None:
    if len(roster) < 2:
        raise FedcliError("secure aggregation needs at least 2 members in the round")
    for m in roster:
        check_name(m, "member id")
    if me is not None and me not in roster:
        raise FedcliError(f"member {me!r} is not in this round's roster")


def sum_masked(updates: Iterable[np.ndarray]) -> np.ndarray:
    """Sum of masked uint32 vectors modulo 2**32 (numpy uint32 arithmetic wraps)."""
    total = None
    for u in updates:
        u = np.asarray(u)
        if u.dtype != np.uint32:
            raise FedcliError(f"a masked update must be uint32, got {u.dtype}")
        if total is None:
            total = u.reshape(-1).copy()
        elif u.size != total.size:
            raise FedcliError(f"masked updates differ in size ({u.size} vs {total.size})")
        else:
            np.add(total, u.reshape(-1), out=total)
    if total is None:
        raise FedcliError("no masked updates to sum")
    return total


# --- dropouts -------------------------------------------------------------------------------


def check_recovery(
    roster: Iterable[str], survivors: Iterable[str], dropped: Iterable[str], min_survivors: int = 2
) -> None:
    """Refuse a drop declaration that would let the coordinator unmask someone.

    survivors and dropped must split the roster exactly; with fewer than min_survivors
    survivors (never below 2) the 'sum' would be one member's update in the clear.
    """
    roster, survivors, dropped = set(roster), set(survivors), set(dropped)
    if survivors & dropped:
        raise VerificationError(f"drop declaration lists {sorted(survivors & dropped)} both as survivor and dropped")
    if survivors | dropped != roster:
        raise VerificationError("drop declaration does not split the round's roster exactly")
    need = max(2, min_survivors)
    if len(survivors) < need:
        raise FedcliError(
            f"only {len(survivors)} survivor(s): secure aggregation needs at least {need}, round cannot complete"
        )


def recovery_seeds(
    federation: str,
    round_: int,
    me: str,
    my_key: X25519PrivateKey,
    roster: Mapping[str, X25519PublicKey],
    dropped: Iterable[str],
    base_sha: str = "",
) -> dict[str, bytes]:
    """What survivor `me` reveals so the coordinator can remove its masks with dropped members:
    the seed it shares with each of them, for this round only. Never call it for a member whose
    update was received (the caller checks the signed drop declaration first)."""
    _check_roster(roster, me)
    dropped = sorted(set(dropped))
    if me in dropped:
        raise FedcliError(f"member {me!r} is declared dropped for round {round_}: it reveals nothing")
    out = {}
    for d in dropped:
        if d not in roster:
            raise FedcliError(f"dropped member {d!r} is not in this round's roster")
        out[d] = pair_seed(federation, round_, me, my_key, d, roster[d], base_sha)
    return out


def unmask_sum(
    masked_sum: np.ndarray,
    survivors: Iterable[str],
    revealed: Mapping[tuple[str, str], bytes],
) -> np.ndarray:
    """Remove the masks left in the survivors' sum: revealed[(survivor, dropped)] is the seed
    that survivor shared with the dropped member. With no dropouts, revealed is empty and the
    masks have already cancelled."""
    survivors = set(survivors)
    out = np.array(masked_sum, dtype=np.uint32, copy=True).reshape(-1)
    for (s, d), seed in sorted(revealed.items()):
        if s not in survivors or d in survivors:
            raise VerificationError(f"revealed seed for pair ({s!r}, {d!r}) is not survivor/dropped")
        # survivor s applied sign(s, d) * mask; undo it.
        _apply(out, seed, -_sign(s, d))
    return out


# --- fixed point ----------------------------------------------------------------------------


def fixed_point_scale(clip: float, n_members: int) -> float:
    """Largest power of two such that the sum of n_members values in [-clip, clip], each
    rounded up by at most 1, stays inside +-2**(31 - HEADROOM_BITS): the mod-2**32 sum never
    wraps, and a sum with a missing or wrong mask (uniform words) lands inside that range with
    probability at most 2**-HEADROOM_BITS per coordinate, so check_range catches it."""
    if not (clip > 0 and math.isfinite(clip)):
        raise FedcliError(f"secagg clip must be a positive number, got {clip!r}")
    if n_members < 1:
        raise FedcliError("secure aggregation needs at least one member")
    room = (2 ** (MODULUS_BITS - 1 - HEADROOM_BITS) - 1) / n_members - 1
    if room < 1 / clip:
        raise FedcliError(f"too many members ({n_members}) for {MODULUS_BITS}-bit secure aggregation")
    return 2.0 ** math.floor(math.log2(room / clip))


def quantize(x: np.ndarray, clip: float, scale: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clip to [-clip, clip], scale, stochastically round (unbiased) and reduce mod 2**32."""
    rng = rng or secure_numpy_rng()  # rounding needs unpredictable, not cryptographic, bits
    y = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), -clip, clip) * scale
    if not np.all(np.isfinite(y)):
        raise FedcliError("update holds NaN or infinite values")
    low = np.floor(y)
    q = low + (rng.random(y.size) < (y - low))
    return (q.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)


def check_range(total: np.ndarray, n_summed: int, clip: float, scale: float) -> None:
    """Refuse an unmasked sum with a coordinate outside +-n*(clip*scale + 1): only a missing,
    stale or wrong mask (or a bank that masked against another base global) puts it there."""
    bound = n_summed * (clip * scale + 1)
    words = np.asarray(total, dtype=np.uint32).view(np.int32)
    outside = int(np.count_nonzero(np.abs(words.astype(np.int64)) > bound))
    if outside:
        raise VerificationError(
            f"the unmasked sum has {outside} of {words.size} coordinates outside ±{n_summed}·clip: a mask is missing "
            "or wrong (a bank masked against another base global, or a file was altered); nothing is published",
            reason="secagg",
        )


def dequantize(total: np.ndarray, scale: float) -> np.ndarray:
    """Decode a mod-2**32 sum as signed int32 and undo the scale (float64)."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / scale


# --- differential privacy -------------------------------------------------------------------


def member_noise_multiplier(noise_multiplier: float, mode: str, min_survivors: int) -> float:
    """Noise multiplier each member applies so the aggregate carries `noise_multiplier`.

    full: every member adds the whole noise; its update is private on its own (even if the
      masks were broken) but the sum carries sqrt(n) times more noise than needed.
    shared: every member adds noise_multiplier / sqrt(min_survivors), so the sum of any
      min_survivors honest members carries the full noise; this relies on secure aggregation
      and on at least min_survivors members being honest (colluders can subtract their own share).
    """
    if mode not in _NOISE_MODES:
        raise FedcliError(f"secagg noise mode must be one of {', '.join(_NOISE_MODES)}, got {mode!r}")
    if noise_multiplier < 0:
        raise FedcliError("noise multiplier must be >= 0")
    if mode == "full":
        return noise_multiplier
    if min_survivors < 2:
        raise FedcliError("shared noise needs min_survivors >= 2")
    return noise_multiplier / math.sqrt(min_survivors)


# --- flat vectors --------------------------------------------------------------------------


def flatten(tensors: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """Concatenate tensors in sorted-name order (every member uses the same order)."""
    layout = [(name, tuple(np.shape(tensors[name]))) for name in sorted(tensors)]
    if not layout:
        return np.zeros(0, dtype=np.float64), layout
    flat = np.concatenate([np.asarray(tensors[n], dtype=np.float64).reshape(-1) for n, _ in layout])
    return flat, layout


def unflatten(flat: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Inverse of flatten."""
    out, pos = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[pos : pos + size].reshape(shape)
        pos += size
    if pos != flat.size:
        raise FedcliError(f"flat vector has {flat.size} values, layout expects {pos}")
    return out
