"""The one content hash: SHA-256 as lowercase hex, as signed documents name bytes."""

import hashlib


def sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of bytes (tensor files, spec, bundle members, server state)."""
    return hashlib.sha256(data).hexdigest()
