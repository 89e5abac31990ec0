"""Streaming aggregation: one update in memory at a time, float64 accumulators.

Memory is O(model): the accumulator plus the update being folded in, whatever the number
of banks.
"""

import numpy as np


class FedAvg:
    """Weighted mean of deltas, weights = num_examples (McMahan et al. 2017)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.sum = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
        self.weight = 0.0
        self.count = 0

    def add(self, delta: dict[str, np.ndarray], weight: float) -> None:
        for k, acc in self.sum.items():
            acc += np.asarray(delta[k], dtype=np.float64) * weight
        self.weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        if self.weight <= 0:
            raise ValueError("no updates were added")
        return {k: v / self.weight for k, v in self.sum.items()}


def apply(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Next global = base + mean delta, computed in float64 and stored as float32."""
    return {k: (base[k].astype(np.float64) + delta[k]).astype(np.float32) for k in base}
