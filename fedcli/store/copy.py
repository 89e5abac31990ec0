"""Moving a federation to another store: copy every object, verified, in an order that is safe to read mid-copy.

Why a command: the banks' state is kept per federation id (bank.state), not per store, so a full
copy of the history is the same federation to them: they continue on the new store without a
rollback alarm. A partial copy is not (its newest global would be older than what they saw), so the
copy reads back every object it wrote and compares its sha256. Tensors go before the manifests
that commit them, globals in round order, the final marker last: a bank reading the new store
mid-copy sees an older, consistent federation at worst. Lock records and probes are not copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedcli.digest import sha256
from fedcli.errors import AlreadyExists, InputError, StoreError
from fedcli.store.base import Store

MAX_OBJECT_BYTES = 1 << 30  # larger than any file fedcli writes for a model it can train
SKIPPED = ("locks/", "probe/")


@dataclass
class CopyResult:
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # already in the destination, byte for byte
    skipped: list[str] = field(default_factory=list)  # lock records and probes


def _order(key: str) -> tuple[int, str]:
    """Tensors and other data first, then the signed documents (spec signature, manifests), the end last."""
    if key == "final.json":
        return 3, key
    if key.endswith(".json") or key.endswith(".sig"):
        return 2 if key.endswith("global.json") else 1, key
    return 0, key


def copy_store(src: Store, dst: Store) -> CopyResult:
    """Copy every object of src into dst, create-only, each read back and compared; refuse a conflicting dst."""
    if src.url == dst.url:
        raise StoreError(f"{src} and {dst} are the same store")
    result = CopyResult()
    for key in sorted(src.list(), key=_order):
        if key.startswith(SKIPPED):
            result.skipped.append(key)
            continue
        size = src.size(key)
        if size > MAX_OBJECT_BYTES:
            raise StoreError(f"{src}: {key} is {size:,} bytes, larger than any file fedcli writes: not copied")
        data = src.get(key, max_bytes=MAX_OBJECT_BYTES)
        try:
            dst.put(key, data, create_only=True)
        except AlreadyExists:
            if sha256(dst.get(key, max_bytes=MAX_OBJECT_BYTES)) != sha256(data):
                raise InputError(f"{dst} already holds {key} with other content: copy into an empty store") from None
            result.unchanged.append(key)
            continue
        if sha256(dst.get(key, max_bytes=MAX_OBJECT_BYTES)) != sha256(data):
            raise StoreError(f"{dst}: {key} reads back different from what was written: the copy is not whole")
        result.copied.append(key)
    return result
