"""Store backends behind one small interface; `open_store` picks one from a URL or path."""

from .base import Store


def open_store(location: str) -> Store:
    """Open a store from `s3://bucket/prefix` or a folder path."""
    if location.startswith("s3://"):
        from .s3 import S3Store

        return S3Store.from_url(location)
    from .folder import FolderStore

    return FolderStore(location)


__all__ = ["Store", "open_store"]
