"""Streaming aggregation: one update in memory at a time, float64 accumulators.

Memory is O(model): the accumulator plus the update being folded in, whatever the number
of banks. The arithmetic runs in chunks through one small float64 scratch buffer, so no
model-sized temporary is allocated per update (fresh large allocations cost page faults,
which dominated the time before; see docs/benchmarks.md).
"""

import numpy as np

CHUNK = 1 << 16  # elements per step: 512 KiB of float64, stays in cache


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(start + CHUNK, n))


def axpy(acc: np.ndarray, x: np.ndarray, a: float, scratch: np.ndarray) -> None:
    """acc += a * x in float64, chunk by chunk through `scratch` (float64, CHUNK long)."""
    flat_acc, flat_x = acc.reshape(-1), np.asarray(x).reshape(-1)
    for s in _chunks(flat_acc.size):
        tmp = scratch[: s.stop - s.start]
        np.multiply(flat_x[s], a, out=tmp, dtype=np.float64)
        np.add(flat_acc[s], tmp, out=flat_acc[s])


class FedAvg:
    """Weighted mean of deltas, weights = num_examples (McMahan et al. 2017)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.sum = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}
        self.weight = 0.0
        self.count = 0
        self._scratch = np.empty(CHUNK, dtype=np.float64)

    def add(self, delta: dict[str, np.ndarray], weight: float) -> None:
        """sum += weight * delta, in float64, chunk by chunk (delta may be a read-only view)."""
        if self._scratch is None:
            raise ValueError("mean() was already taken; start a new FedAvg")
        for k, acc in self.sum.items():
            d = np.asarray(delta[k])
            if d.shape != acc.shape:
                raise ValueError(f"{k}: shape {d.shape} != {acc.shape}")
            axpy(acc, d, weight, self._scratch)
        self.weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean, computed in place in the accumulators (no second model-sized copy).

        Taking it ends the aggregation: add() refuses afterwards; mean() again returns the same.
        """
        if self.weight <= 0:
            raise ValueError("no updates were added")
        if self._scratch is not None:
            for v in self.sum.values():
                np.divide(v, self.weight, out=v)
            self._scratch = None
        return self.sum


def add_cast(base: np.ndarray, step: np.ndarray, lr: float = 1.0) -> np.ndarray:
    """base + lr * step computed in float64 chunk by chunk, returned in base's float dtype."""
    b = np.asarray(base)
    out, scratch = np.empty(b.shape, dtype=b.dtype), np.empty(CHUNK, dtype=np.float64)
    flat_b, flat_s, flat_o = b.reshape(-1), np.asarray(step).reshape(-1), out.reshape(-1)
    for s in _chunks(flat_o.size):
        tmp = scratch[: s.stop - s.start]
        np.multiply(flat_s[s], lr, out=tmp, dtype=np.float64)
        np.add(tmp, flat_b[s], out=tmp)
        flat_o[s] = tmp
    return out


def apply(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Next global = base + mean delta, computed in float64 and stored as float32."""
    return {k: add_cast(np.asarray(b, dtype=np.float32), delta[k]) for k, b in base.items()}
