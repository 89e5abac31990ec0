"""Update-level DP: clip a bank's whole update and add Gaussian noise before export.

Unit of privacy: the bank's whole contribution to a round (its update versus a zero update).
"""

from __future__ import annotations

import math

import numpy as np

from fedcli.errors import FedcliError
from fedcli.norms import clip_factor, update_norm
from fedcli.privacy.accounting import Mechanism
from fedcli.randomness import secure_numpy_rng


def clip_update(update: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update so its L2 norm is at most ``clip``; returns (clipped, norm before).

    The bound is enforced after casting back to each array's dtype (float32 rounding could
    otherwise overshoot by ~1e-7), because the sensitivity the accountant assumes must hold exactly.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise FedcliError(f"clip must be a positive number, got {clip}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise FedcliError("update contains NaN or infinite values")
    if norm <= clip:
        return {k: np.array(v, copy=True) for k, v in update.items()}, norm
    factor = clip_factor(norm, clip)
    while True:
        clipped = {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.asarray(v).dtype) for k, v in update.items()}
        if update_norm(clipped) <= clip:
            return clipped, norm
        factor *= 1 - 1e-7


def add_gaussian_noise(
    update: dict[str, np.ndarray], std: float, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Add N(0, std^2) to every coordinate of the update.

    Each noise value is the sum of four standard normals divided by two (std 1), drawn in
    float64 and added before casting back: the mitigation Opacus uses against floating-point
    attacks on naive Gaussian samplers (Holohan & Braghin 2021; Jin et al. 2022).
    ``rng`` defaults to a fresh :func:`secure_numpy_rng`; pass one only in tests.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise FedcliError(f"noise std must be a non-negative number, got {std}")
    rng = rng or secure_numpy_rng()
    out = {}
    for name, a in update.items():
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise FedcliError(f"update tensor {name!r} is not floating point; it cannot be noised")
        noise = rng.standard_normal((4, *a.shape)).sum(axis=0) / 2.0
        out[name] = (a.astype(np.float64) + std * noise).astype(a.dtype)
    return out


def privatize_update(
    update: dict[str, np.ndarray], clip: float, noise_multiplier: float
) -> tuple[dict[str, np.ndarray], dict]:
    """Clip the whole update to ``clip`` and add Gaussian noise of std ``noise_multiplier*clip``.

    Returns the noised update and the manifest's ``dp`` record (no epsilon: that is the
    ledger's job, since it depends on every round the bank has joined). The raw norm, and
    whether clipping bit, are data-dependent and deliberately left out of the record.
    """
    mech = Mechanism(mode="update", noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, clip=clip)
    clipped, _ = clip_update(update, clip)
    return add_gaussian_noise(clipped, noise_multiplier * clip), mech.manifest()
