"""The one place secret randomness comes from: generators seeded from the OS CSPRNG.

DP noise, stochastic rounding and sampling draw from these; nothing uses ``random`` or a
fixed seed for them. Tests may pass their own seeded generator where a function takes one.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is heavy; import it only where tensors are touched
    import torch


def secure_numpy_rng() -> np.random.Generator:
    """A numpy PCG64 generator seeded with 128 bits from the OS CSPRNG (``secrets``).

    Why: the guarantee of the Gaussian mechanism holds only if the adversary cannot predict
    the noise. A fixed or time-based seed would let anyone who knows it subtract the noise.
    PCG64 is not itself a CSPRNG, but its 128-bit state is drawn fresh from the OS for every
    release and never stored, so the noise cannot be replayed or predicted.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def secure_torch_generator() -> torch.Generator:
    """A torch generator seeded from the OS CSPRNG (64 bits: the most ``manual_seed`` takes).

    Used for Opacus's Poisson sampling and gradient noise. Opacus's own ``secure_mode`` needs
    torchcsprng, which has no build for Python 3.11 / torch 2.x; a fresh secret seed per
    training run is the best the installed stack offers (see docs/privacy.md, Randomness).
    """
    import torch

    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(64))
    return gen
