"""Safetensors encode/decode with the checks a file from the store must pass.

Nothing from the store is ever unpickled: safetensors is a JSON header plus raw bytes.
Before parsing we bound the header size and the file size, then require exactly the
tensor names, shapes and dtype the federation's model has, and finite values.
"""

import hashlib
import json
import struct

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import VerificationError

MAX_HEADER_BYTES = 1 << 20  # 1 MiB: far more than any model here needs

Shapes = dict[str, tuple[int, ...]]


def encode(tensors: dict[str, np.ndarray]) -> bytes:
    """Deterministic bytes (sorted names, little-endian float32 unless given otherwise)."""
    return st_save({k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def itemsizes(shapes: Shapes, dtype: str | dict[str, str] = "float32") -> dict[str, int]:
    """Bytes per element of each tensor; `dtype` is one for all or one per name (compressed updates)."""
    return {k: np.dtype(dtype[k] if isinstance(dtype, dict) else dtype).itemsize for k in shapes}


def max_file_size(shapes: Shapes, itemsize: int | dict[str, int] = 4) -> int:
    size = itemsize if isinstance(itemsize, dict) else dict.fromkeys(shapes, itemsize)
    return 8 + MAX_HEADER_BYTES + sum(size[k] * int(np.prod(s)) for k, s in shapes.items())


def decode(data: bytes, shapes: Shapes, what: str, dtype: str | dict[str, str] = "float32") -> dict[str, np.ndarray]:
    """Parse and check a safetensors file; raise VerificationError naming the first problem."""
    if len(data) < 8:
        raise VerificationError(f"{what}: file is truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise VerificationError(f"{what}: safetensors header length {header_len} is too large or truncated")
    if len(data) > max_file_size(shapes, itemsizes(shapes, dtype)):
        raise VerificationError(f"{what}: file is larger than the model allows ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise VerificationError(f"{what}: not a valid safetensors file ({e.__class__.__name__})") from None
    names = set(header) - {"__metadata__"}
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
        raise VerificationError(f"{what}: tensor names do not match the model (missing {missing}, unexpected {extra})")
    for name, expected in shapes.items():
        arr, want = tensors[name], np.dtype(dtype[name] if isinstance(dtype, dict) else dtype)
        if arr.dtype != want:
            raise VerificationError(f"{what}: tensor {name} has dtype {arr.dtype}, expected {want}")
        if tuple(arr.shape) != tuple(expected):
            raise VerificationError(f"{what}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(expected)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise VerificationError(f"{what}: tensor {name} has NaN or infinite values")
    return tensors
