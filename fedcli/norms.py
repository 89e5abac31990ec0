"""The one L2 norm of an update and the one clipping rule, shared by DP and robust aggregation.

A bank clips its whole update before noising it (privacy/noise.py); the coordinator bounds each
update's norm before combining (aggregation/aggregators.py). Both use these two functions, so the
two clipping paths cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np

from fedcli.errors import FedcliError


def update_norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm of all arrays of an update taken together, computed in float64."""
    total = 0.0
    for name, a in update.items():
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise FedcliError(f"update tensor {name!r} is not floating point; it cannot be clipped and noised")
        total += float(np.sum(a.astype(np.float64) ** 2))
    return math.sqrt(total)


def clip_factor(norm: float, max_norm: float) -> float:
    """Factor that scales an update of `norm` down to at most `max_norm` (1.0 if already inside)."""
    if max_norm <= 0:
        raise FedcliError(f"max_norm must be positive, got {max_norm}")
    if not math.isfinite(norm):
        return 0.0  # a NaN/inf update contributes nothing
    return 1.0 if norm <= max_norm else max_norm / norm
