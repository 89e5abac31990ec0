"""Store backends behind one small interface; `open_store` picks one from a URL or path."""

import secrets

from fedcli.errors import AlreadyExists, StoreError
from fedcli.store.base import Store


def open_store(location: str) -> Store:
    """Open a store from `s3://bucket/prefix` or a folder path."""
    if location.startswith("s3://"):
        from fedcli.store.s3 import S3Store

        return S3Store.from_url(location)
    from fedcli.store.folder import FolderStore

    return FolderStore(location)


def check_create_only(store: Store) -> None:
    """Prove the store refuses a second create-only write of one key; raise StoreError if not.

    Everything fedcli commits relies on it. Some S3-compatible servers ignore If-None-Match
    and some network mounts refuse hard links: run this once when setting a store up.
    """
    key = f"probe/create-only-{secrets.token_hex(8)}"
    try:
        store.put(key, b"first", create_only=True)
        try:
            store.put(key, b"second", create_only=True)
        except AlreadyExists:
            if store.get(key, max_bytes=16) == b"first":
                return
        raise StoreError(
            f"{store} does not honour create-only writes (the second write replaced the first): "
            "two coordinators could both publish a round; use a server that supports If-None-Match"
        )
    finally:
        store.delete(key)


__all__ = ["Store", "open_store", "check_create_only"]
