"""Update compression for a narrow (air-gapped) channel: 8-bit quantisation and top-k sparsification.

Both are lossy, so the bank keeps an error-feedback residual (what compression dropped last
time) in a local state file and adds it to the next delta before compressing: over rounds
nothing is lost, only delayed (Seide et al. 2014; Stich et al. 2018). The residual never
leaves the bank. Encoded tensors are plain safetensors-ready arrays under suffixed names
("<tensor>#q8", "<tensor>#scale", "<tensor>#idx", "<tensor>#val"; '#' never occurs in a
torch parameter name); the manifest records the method, and the coordinator decodes against
the global model's shapes, refusing anything malformed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedcli.errors import FedcliError, VerificationError

Arrays = Mapping[str, np.ndarray]
METHODS = ("none", "int8", "topk")


def check(method: str, ratio: float | None = None) -> dict:
    """Manifest metadata for a compression setting, after validating it."""
    if method not in METHODS:
        raise FedcliError(f"unknown compression {method!r}: use one of {', '.join(METHODS)}")
    if method == "topk":
        if ratio is None or isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise FedcliError(f"topk compression needs a ratio in (0, 1], got {ratio!r}")
        return {"method": "topk", "ratio": float(ratio)}
    return {"method": method}


def _with_residual(delta: Arrays, residual: Arrays | None) -> dict[str, np.ndarray]:
    out = {}
    for k, v in delta.items():
        x = np.asarray(v, dtype=np.float64)
        if residual is not None and k in residual:
            r = np.asarray(residual[k], dtype=np.float64)
            if r.shape != x.shape:
                raise FedcliError(
                    f"error-feedback residual for {k!r} has shape {r.shape}, expected {x.shape}: delete the bank's residual file"
                )
            x = x + r
        out[k] = x
    return out


def _topk_count(size: int, ratio: float) -> int:
    return 0 if size == 0 else min(size, max(1, math.ceil(ratio * size)))


def encode(delta: Arrays, method: str, ratio: float | None = None, residual: Arrays | None = None):
    """Compress delta (+ residual): returns (tensors to send, manifest metadata, new residual to keep)."""
    meta = check(method, ratio)
    x = _with_residual(delta, residual)
    tensors: dict[str, np.ndarray] = {}
    for k, v in x.items():
        if method == "none":
            tensors[k] = v.astype(np.float32)
        elif method == "int8":
            peak = float(np.max(np.abs(v))) if v.size else 0.0
            if not math.isfinite(peak):
                raise FedcliError(f"tensor {k!r} has non-finite values; refusing to compress")
            scale = peak / 127.0
            q = np.zeros(v.shape, np.int8) if scale == 0 else np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
            tensors[f"{k}#q8"] = q
            tensors[f"{k}#scale"] = np.array([scale], dtype=np.float32)
        else:
            flat = v.reshape(-1)
            n = _topk_count(flat.size, meta["ratio"])
            idx = np.sort(np.argpartition(-np.abs(flat), n - 1)[:n]) if n < flat.size else np.arange(flat.size)
            tensors[f"{k}#idx"] = idx.astype(np.int32 if flat.size < 2**31 else np.int64)
            tensors[f"{k}#val"] = flat[idx].astype(np.float32)
    shapes = {k: v.shape for k, v in x.items()}
    decoded = decode(tensors, meta, shapes)
    new_residual = {k: (x[k] - decoded[k]).astype(np.float32) for k in x}
    return tensors, meta, new_residual


def layout(meta: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Exact names, shapes and dtypes an encoded update must have, so the file is checked before decoding."""
    method = meta.get("method", "none")
    check(method, meta.get("ratio"))
    enc_shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for k, shape in shapes.items():
        shape = tuple(shape)
        if method == "none":
            enc_shapes[k], dtypes[k] = shape, "float32"
        elif method == "int8":
            enc_shapes[f"{k}#q8"], dtypes[f"{k}#q8"] = shape, "int8"
            enc_shapes[f"{k}#scale"], dtypes[f"{k}#scale"] = (1,), "float32"
        else:
            size = math.prod(shape)
            n = _topk_count(size, meta["ratio"])
            enc_shapes[f"{k}#idx"], dtypes[f"{k}#idx"] = (n,), "int32" if size < 2**31 else "int64"
            enc_shapes[f"{k}#val"], dtypes[f"{k}#val"] = (n,), "float32"
    return enc_shapes, dtypes


def decode(tensors: Arrays, meta: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Dense float32 delta from encoded tensors; `shapes` come from the global model, not the sender."""
    method = meta.get("method", "none")
    check(method, meta.get("ratio"))
    suffixes = {"none": [""], "int8": ["#q8", "#scale"], "topk": ["#idx", "#val"]}[method]
    expected = {k + s for k in shapes for s in suffixes}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise VerificationError(
            f"{method} update tensors do not match the model (unexpected {extra[:3]}, missing {missing[:3]})"
        )
    out = {}
    for k, shape in shapes.items():
        shape = tuple(shape)
        if method == "none":
            v = np.asarray(tensors[k])
            if v.shape != shape or not np.issubdtype(v.dtype, np.floating):
                raise VerificationError(f"tensor {k!r}: got {v.dtype}{list(v.shape)}, expected float{list(shape)}")
            out[k] = v.astype(np.float32, copy=False)  # a float32 view stays a view: no copy
        elif method == "int8":
            q, s = np.asarray(tensors[f"{k}#q8"]), np.asarray(tensors[f"{k}#scale"])
            if q.dtype != np.int8 or q.shape != shape or s.shape != (1,) or not np.issubdtype(s.dtype, np.floating):
                raise VerificationError(f"int8 tensor {k!r} is malformed")
            scale = float(s[0])
            if not (math.isfinite(scale) and scale >= 0):
                raise VerificationError(f"int8 tensor {k!r} has an invalid scale {scale}")
            out[k] = (q.astype(np.float64) * scale).astype(np.float32)
        else:
            idx, val = np.asarray(tensors[f"{k}#idx"]), np.asarray(tensors[f"{k}#val"])
            size = math.prod(shape)
            n = _topk_count(size, meta["ratio"])
            if (
                idx.dtype not in (np.int32, np.int64)
                or idx.shape != (n,)
                or val.shape != (n,)
                or val.dtype != np.float32
            ):
                raise VerificationError(
                    f"top-k tensor {k!r} is malformed (expected {n} int indices and float32 values)"
                )
            if n and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0)):
                raise VerificationError(f"top-k tensor {k!r} has indices out of range or not strictly increasing")
            dense = np.zeros(size, dtype=np.float32)
            dense[idx] = val
            out[k] = dense.reshape(shape)
        if not np.all(np.isfinite(out[k])):
            raise VerificationError(f"tensor {k!r} has non-finite values")
    return out


def wire_bytes(tensors: Arrays) -> int:
    """Payload bytes of an encoded update (the safetensors file adds a small JSON header)."""
    return int(sum(np.asarray(v).nbytes for v in tensors.values()))


# ----- the bank's local error-feedback state (never sent) -----


def residual_path(state_path: Path) -> Path:
    """Where a bank keeps its residual: next to its state file."""
    return Path(state_path).with_suffix(".residual.safetensors")


def load_residual(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The residual left by the last compressed update, or None on the first one.

    Read like any untrusted tensor file (size bound first, safetensors checks, finite values),
    since a damaged residual would otherwise be added into the next update.
    """
    from fedcli.files import read_bounded
    from fedcli.protocol import tensors

    what = f"error-feedback residual {path}"
    try:
        data = read_bounded(Path(path), tensors.max_file_size(shapes), "error-feedback residual")
        return None if data is None else dict(tensors.decode(data, shapes, what))
    except FedcliError as e:
        raise FedcliError(f"{e}; delete it to start afresh") from None


def save_residual(path: Path, residual: Arrays) -> None:
    """Atomic write (files.write_atomic), so a crash never leaves half a residual."""
    from safetensors.numpy import save

    from fedcli.files import write_atomic

    write_atomic(
        Path(path), save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in residual.items()}), ".residual-"
    )
