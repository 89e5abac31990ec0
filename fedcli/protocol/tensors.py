"""Safetensors encode/decode with the checks a file from the store must pass.

Nothing from the store is ever unpickled: safetensors is a JSON header plus raw bytes.
Before parsing we bound the header size and the file size, then require exactly the
tensor names, shapes and dtype the federation's model has, and finite values.
"""

import json
import math
import struct
from collections.abc import Mapping
from typing import TypeGuard

import numpy as np
from safetensors.numpy import save as st_save

from fedcli.contract import check_depth
from fedcli.errors import ContractError, FedcliError, Oversize, VerificationError

MAX_HEADER_BYTES = 1 << 20  # 1 MiB: far more than any model here needs
HEADER_DEPTH = 4  # {name: {"shape": [..]}}: a valid header nests 3 levels

Shapes = Mapping[str, tuple[int, ...]]
# safetensors dtype names -> little-endian numpy dtypes (bf16 has no numpy type: refused)
ST_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "U32": "<u4",
    "BOOL": "?",
}  # U32: masked updates (secagg)


def encode(tensors: dict[str, np.ndarray]) -> bytes:
    """Deterministic bytes (sorted names, little-endian float32 unless given otherwise)."""
    return st_save({k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)})


def itemsizes(shapes: Shapes, dtype: str | dict[str, str] = "float32") -> dict[str, int]:
    """Bytes per element of each tensor; `dtype` is one for all or one per name (compressed updates)."""
    return {k: np.dtype(dtype[k] if isinstance(dtype, dict) else dtype).itemsize for k in shapes}


def max_file_size(shapes: Shapes, itemsize: int | dict[str, int] = 4) -> int:
    size = itemsize if isinstance(itemsize, dict) else dict.fromkeys(shapes, itemsize)
    return 8 + MAX_HEADER_BYTES + sum(size[k] * int(np.prod(s)) for k, s in shapes.items())


def views(data, header: dict, start: int) -> dict[str, np.ndarray]:
    """Zero-copy arrays over `data`, after the checks safetensors' own loader makes.

    Every tensor needs a known dtype, a shape of non-negative ints and offsets whose length
    matches; together the tensors must tile the data section exactly (no gap, overlap or
    trailing bytes). Raises ValueError otherwise.
    """
    body, spans, out = len(data) - start, [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in ST_DTYPES:
            raise ValueError(f"tensor {name!r}: missing or unsupported dtype")
        dt, shape, offsets = np.dtype(ST_DTYPES[info["dtype"]]), info.get("shape"), info.get("data_offsets")
        if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {name!r}: malformed shape or offsets")
        (begin, end), count = offsets, math.prod(shape)
        if not begin <= end <= body or end - begin != count * dt.itemsize:
            raise ValueError(f"tensor {name!r}: offsets do not match its shape")
        spans.append((begin, end))
        out[name] = np.frombuffer(data, dt, count, start + begin).reshape(shape)
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError("tensors overlap or leave a gap")
        pos = end
    if pos != body:
        raise ValueError("trailing bytes after the last tensor")
    return out


def _naturals(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def decode(
    data: bytes | memoryview, shapes: Shapes, what: str, dtype: str | dict[str, str] = "float32"
) -> dict[str, np.ndarray]:
    """Parse and check a safetensors file; raise VerificationError naming the first problem.

    The arrays returned are read-only views into `data` when it is bytes (no copy).
    """
    if len(data) < 8:
        raise ContractError(f"{what}: file is truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise ContractError(f"{what}: safetensors header length {header_len} is too large or truncated")
    if len(data) > max_file_size(shapes, itemsizes(shapes, dtype)):
        raise Oversize(f"{what}: file is larger than the model allows ({len(data)} bytes)")
    raw = bytes(data[8 : 8 + header_len])
    check_depth(raw, f"{what}: safetensors header", max_depth=HEADER_DEPTH)  # json.loads recurses per level
    try:
        header = json.loads(raw, parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise ValueError("the header is not a table")
        tensors = views(data, header, 8 + header_len)
    except (ValueError, TypeError, AttributeError, RecursionError) as e:  # bad JSON or UTF-8, bad layout
        raise ContractError(f"{what}: not a valid safetensors file ({str(e)[:200]})") from None
    names = set(header) - {"__metadata__"}
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
        raise ContractError(
            f"{what}: tensor names do not match the model (missing {_few(missing)}, unexpected {_few(extra)})"
        )
    for name, expected in shapes.items():
        arr, want = tensors[name], np.dtype(dtype[name] if isinstance(dtype, dict) else dtype)
        if arr.dtype != want:
            raise ContractError(f"{what}: tensor {name} has dtype {arr.dtype}, expected {want}")
        if tuple(arr.shape) != tuple(expected):
            raise ContractError(f"{what}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(expected)}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise VerificationError(f"{what}: tensor {name} has NaN or infinite values", reason="not-finite")
    return tensors


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _few(names: list[str]) -> str:
    """A list of tensor names for a one-line message: a planted header may hold thousands."""
    shown = [n[:60] for n in names[:5]]
    return f"{shown}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_finite(tensors: dict[str, np.ndarray], what: str, error: type[FedcliError] = VerificationError) -> None:
    """Refuse NaN or infinity (reason not-finite): in a decoded update, a global or a server state."""
    for name, arr in tensors.items():
        if np.asarray(arr).dtype.kind == "f" and not np.isfinite(arr).all():
            raise error(f"{what}: tensor {name} has NaN or infinite values", reason="not-finite")
