"""The one content hash: SHA-256 as lowercase hex, as signed documents name bytes."""

import hashlib
from collections.abc import Iterable

Bytes = bytes | bytearray | memoryview


def sha256(data: Bytes) -> str:
    """Hex SHA-256 of bytes (tensor files, spec, bundle members, server state, key fingerprints)."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(chunks: Iterable[Bytes]) -> tuple[str, int]:
    """Hex SHA-256 of chunks as they arrive, and their total length.

    Why: a tensor file is hashed while it is read into its buffer, in one cache-hot pass,
    instead of being read whole and hashed again; the hash is the same as sha256 of the whole.
    """
    hasher, size = hashlib.sha256(), 0
    for chunk in chunks:
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size
