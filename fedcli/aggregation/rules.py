"""Aggregation rules over model deltas (dicts name -> np.ndarray), with bounded memory.

Deltas are float32 on disk; every sum here is float64 so the order of arrival does not
change the result noticeably. The robust rules (median, trimmed mean, Krum) never hold
all updates at once: they pull one row-chunk of every update through a `read` callable,
so memory is about n_updates x chunk_elems x 8 bytes whatever the model size.

`read(i, name, start, stop)` returns rows start:stop (first axis) of tensor `name` of
update i; a 0-d tensor counts as one row. `memory_reader` and `safetensors_reader` build one.

The mean holds one update in memory at a time: memory is O(model) whatever the number of
banks. The arithmetic runs in chunks through one small float64 scratch buffer, so no
model-sized temporary is allocated per update (fresh large allocations cost page faults,
which dominated the time before; see docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack

import numpy as np

from fedcli.errors import FedcliError

Delta = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]
ReadRows = Callable[[int, str, int, int], np.ndarray]

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


DEFAULT_CHUNK_ELEMS = 1 << 16


# ----- streaming weighted mean (FedAvg, norm bounding, async folding) -----


class WeightedMean:
    """Streaming FedAvg: add(delta, weight) one update at a time, then result() (float64).

    `scale` multiplies the contribution but not the denominator: it carries a norm-bounding
    factor or a staleness discount, so a clipped or stale update counts less in absolute
    terms (FedBuff-style) rather than being renormalised back up.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.total_weight = 0.0
        self.count = 0
        self._scratch: np.ndarray | None = np.empty(CHUNK, dtype=np.float64)  # None once the mean is taken

    def add(self, delta: Delta, weight: float = 1.0, scale: float = 1.0) -> None:
        if self._scratch is None:
            raise FedcliError("the mean was already taken; start a new WeightedMean")
        if not (math.isfinite(weight) and weight > 0):
            raise FedcliError(f"update weight must be a positive number, got {weight}")
        if not (math.isfinite(scale) and scale >= 0):
            raise FedcliError(f"update scale must be a non-negative number, got {scale}")
        if self._shapes and set(delta) != set(self._shapes):
            raise FedcliError("update tensor names differ from the first update's")
        for name, arr in delta.items():
            arr = np.asarray(arr)
            if name in self._shapes and arr.shape != self._shapes[name]:
                raise FedcliError(f"tensor {name!r} has shape {arr.shape}, expected {self._shapes[name]}")
            if name not in self._sum:
                self._sum[name] = np.zeros(arr.shape, dtype=np.float64)
                self._shapes[name] = arr.shape
            # chunked multiply-add: no model-sized float64 temporary per update (see docs/benchmarks.md)
            axpy(self._sum[name], arr, weight * scale, self._scratch)
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The mean (float64: the server step adds it), divided in place: no second model-sized copy.

        Taking it ends the aggregation: add() refuses afterwards; result() again returns the same.
        """
        if self.count == 0:
            raise FedcliError("no updates to aggregate")
        if self._scratch is not None:
            for v in self._sum.values():
                np.divide(v, self.total_weight, out=v)
            self._scratch = None
        return self._sum


# ----- norm bounding -----


def streamed_norm(shapes: Shapes, read: ReadRows, i: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> float:
    """L2 norm of update i, reading it chunk by chunk."""
    s = 0.0
    for name, a, b in iter_chunks(shapes, chunk_elems):
        s += float(np.sum(np.square(np.asarray(read(i, name, a, b), dtype=np.float64))))
    return math.sqrt(s)


# ----- chunked coordinate-wise rules -----


def n_rows(shape: tuple[int, ...]) -> int:
    """Rows along the first axis (a 0-d tensor is one row)."""
    return shape[0] if len(shape) else 1


def iter_chunks(shapes: Shapes, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Iterator[tuple[str, int, int]]:
    """(name, row_start, row_stop) covering every tensor in row blocks of about chunk_elems.

    A single row larger than chunk_elems is still read whole (rows are the slicing unit of
    safetensors)."""
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        rows = n_rows(shape)
        row_size = max(1, math.prod(shape[1:]))
        step = max(1, chunk_elems // row_size)
        for a in range(0, rows, step):
            yield name, a, min(rows, a + step)


def _stack(read: ReadRows, n: int, name: str, a: int, b: int) -> np.ndarray:
    """(n, rows, row_size) float64 block of one chunk across all updates."""
    parts = [np.asarray(read(i, name, a, b), dtype=np.float64).reshape(b - a, -1) for i in range(n)]
    return np.stack(parts)


def _coordinatewise(shapes: Shapes, n: int, read: ReadRows, reduce, chunk_elems: int) -> dict[str, np.ndarray]:
    if n < 1:
        raise FedcliError("no updates to aggregate")
    out = {name: np.empty(tuple(s), dtype=np.float32) for name, s in shapes.items()}
    for name, a, b in iter_chunks(shapes, chunk_elems):
        block = _stack(read, n, name, a, b)
        view = out[name].reshape(n_rows(tuple(shapes[name])), -1)
        view[a:b] = reduce(block)
    return out


def coordinate_median(
    shapes: Shapes, n: int, read: ReadRows, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> dict[str, np.ndarray]:
    """Coordinate-wise median of n updates (Yin et al. 2018); mean of the middle two when n is even."""
    return _coordinatewise(shapes, n, read, lambda blk: np.median(blk, axis=0), chunk_elems)


def trim_count(n: int, trim_ratio: float) -> int:
    """How many values trimmed_mean drops at each end (a ratio below 0.5 always leaves one)."""
    if not 0 <= trim_ratio < 0.5:
        raise FedcliError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    return int(math.floor(trim_ratio * n))


def trimmed_mean(
    shapes: Shapes, n: int, read: ReadRows, trim_ratio: float = 0.1, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the floor(trim_ratio*n) largest and smallest values."""
    k = trim_count(n, trim_ratio)

    def reduce(blk: np.ndarray) -> np.ndarray:
        blk = np.sort(blk, axis=0)
        return blk[k : n - k].mean(axis=0)

    return _coordinatewise(shapes, n, read, reduce, chunk_elems)


# ----- Krum / multi-Krum -----


def pairwise_sq_distances(shapes: Shapes, n: int, read: ReadRows, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> np.ndarray:
    """n x n squared L2 distances between updates, summed chunk by chunk."""
    d = np.zeros((n, n), dtype=np.float64)
    for name, a, b in iter_chunks(shapes, chunk_elems):
        x = _stack(read, n, name, a, b).reshape(n, -1)
        for i in range(n):  # exact differences, not the Gram trick: no cancellation for close updates
            e = x - x[i]
            d[i] += np.einsum("jk,jk->j", e, e)
    return d


def krum_scores(dists: np.ndarray, f: int) -> np.ndarray:
    """Krum score per update: sum of squared distances to its n-f-2 nearest others (Blanchard et al. 2017)."""
    n = dists.shape[0]
    if f < 0:
        raise FedcliError(f"Krum: number of Byzantine banks f must be >= 0, got {f}")
    if n < 2 * f + 3:
        raise FedcliError(f"Krum with f={f} needs at least {2 * f + 3} updates, got {n}")
    closest = n - f - 2
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(dists[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def krum_select(dists: np.ndarray, f: int, m: int = 1) -> list[int]:
    """Indices of the m updates with the lowest Krum scores (m=1: Krum, m>1: multi-Krum)."""
    n = dists.shape[0]
    if not 1 <= m <= n:
        raise FedcliError(f"multi-Krum: m must be between 1 and {n}, got {m}")
    scores = krum_scores(dists, f)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])


# ----- staleness (asynchronous mode) -----


def staleness_discount(staleness: int, kind: str = "polynomial", a: float = 0.5, b: int = 4) -> float:
    """Weight factor for an update computed on a global `staleness` rounds old.

    polynomial: (1+s)^-a (FedBuff uses a=0.5); hinge: 1 up to b, then 1/(a(s-b)+1)
    (Xie et al. 2019, FedAsync); constant: 1."""
    if staleness < 0:
        raise FedcliError(f"staleness must be >= 0, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        if a < 0:
            raise FedcliError(f"staleness exponent must be >= 0, got {a}")
        return float((1.0 + staleness) ** (-a))
    if kind == "hinge":
        if a < 0 or b < 0:
            raise FedcliError("hinge staleness parameters a and b must be >= 0")
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise FedcliError(f"unknown staleness discount {kind!r}: use polynomial, hinge or constant")


# ----- readers -----


def memory_reader(updates: Sequence[Delta]) -> ReadRows:
    """Reader over in-memory deltas (tests, small models)."""

    def read(i: int, name: str, a: int, b: int) -> np.ndarray:
        arr = np.asarray(updates[i][name])
        return arr.reshape(n_rows(arr.shape), -1)[a:b]

    return read


class safetensors_reader:
    """Reader over safetensors files, one open (memory-mapped) handle per file; use as a context manager."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._stack = ExitStack()
        self._files: list = []

    def __enter__(self) -> ReadRows:
        from safetensors import safe_open

        try:
            for p in self._paths:
                self._files.append(self._stack.enter_context(safe_open(str(p), framework="numpy")))
        except Exception as e:
            self._stack.close()
            raise FedcliError(f"cannot open update file: {e}") from None
        return self.read

    def read(self, i: int, name: str, a: int, b: int) -> np.ndarray:
        sl = self._files[i].get_slice(name)
        if len(sl.get_shape()) == 0:
            return np.asarray(self._files[i].get_tensor(name)).reshape(1, 1)[a:b]
        return sl[a:b]

    def __exit__(self, *exc) -> None:
        self._stack.close()
