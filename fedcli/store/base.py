"""The store interface every backend implements.

Keys are relative posix paths checked by `names.check_key`. Writes are atomic: a reader
sees the whole object or nothing. `create_only=True` is the commit primitive: exactly one
of several racing writers wins, the others get `AlreadyExists`.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator

from fedcli.errors import StoreError


class Store(ABC):
    url: str

    @abstractmethod
    def get(self, key: str, *, max_bytes: int) -> bytes:
        """Whole object; raises NotFound, or Oversize (before reading it) when larger than max_bytes.

        Every read is bounded: callers pass the largest size the document can legitimately have.
        """

    @abstractmethod
    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Atomic write; raises AlreadyExists when create_only and the key exists."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes, so callers can refuse oversized objects before reading; raises NotFound."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under prefix (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key if present (used only for locks and temp objects)."""

    def read_into(self, key: str, buf: memoryview) -> Iterator[memoryview]:
        """Fill `buf` with the object, yielding each chunk as it lands so callers hash while reading.

        Raises NotFound, or StoreError if the object does not fit in `buf`. This default reads
        the whole object with get(); backends that can stream override it.
        """
        data = self.get(key, max_bytes=len(buf))
        if len(data) > len(buf):
            raise StoreError(f"{key} in {self.url} is larger than expected ({len(data)} bytes)")
        buf[: len(data)] = data
        yield buf[: len(data)]

    def __str__(self) -> str:
        return self.url
