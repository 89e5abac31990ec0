"""A shared folder (local disk, NFS, SMB mount) as a store.

Atomicity: write to a temp file in the same folder, fsync, then rename (replace) or
hard-link (create-only: link fails if the target exists, so one racer wins).
Transient errors of network file systems (EIO, ESTALE, timeouts...) are retried with
back-off; anything else (permission, disk full) fails at once with one clear line.
"""

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import AlreadyExists, NotFound, Oversize, StoreError
from ..names import check_key
from .base import Store
from . import retry
from .retry import RetryPolicy, with_retry

T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
}


def is_transient(e: BaseException) -> bool:
    """True for OS errors a network mount produces while it recovers."""
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


class FolderStore(Store):
    def __init__(self, root: str | os.PathLike, *, policy: RetryPolicy | None = None):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self.policy = policy or retry.DEFAULT_POLICY  # looked up now, so tests and tools can tune it

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _retry(self, what: str, key: str, op: Callable[[], T]) -> T:
        return with_retry(op, what=f"{what} {key} in {self.url}", transient=is_transient, policy=self.policy)

    def get(self, key: str, *, max_bytes: int) -> bytes:
        path = self._path(key)

        def op() -> bytes:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise Oversize(f"{key} in {self.url} is {size:,} bytes, more than the {max_bytes:,} allowed; not read")
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise Oversize(f"{key} in {self.url} grew past the {max_bytes:,} bytes allowed while reading; not read")
            return data

        try:
            return self._retry("read", key, op)
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} from {self.url}: {e.strerror}") from None

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        path = self._path(key)
        tries = 0

        def op() -> None:
            nonlocal tries
            tries += 1
            self._put_once(key, path, data, create_only)

        try:
            self._retry("write", key, op)
        except AlreadyExists:
            # A retried link may have landed the first time: our bytes there means success.
            if tries > 1 and self._same(path, data):
                return
            raise
        except OSError as e:
            raise StoreError(f"cannot write {key} to {self.url}: {e.strerror}") from None

    def _put_once(self, key: str, path: Path, data: bytes, create_only: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if create_only:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists(f"{key} already exists in {self.url}") from None
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(path.parent)

    @staticmethod
    def _same(path: Path, data: bytes) -> bool:
        try:
            return path.read_bytes() == data
        except OSError:
            return False

    def exists(self, key: str) -> bool:
        # An I/O error must not read as "absent": callers decide what to write from this.
        path = self._path(key)
        try:
            return self._retry("inspect", key, path.is_file)
        except OSError as e:
            raise StoreError(f"cannot inspect {key} in {self.url}: {e.strerror}") from None

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return self._retry("inspect", key, lambda: path.stat().st_size)
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot inspect {key} in {self.url}: {e.strerror}") from None

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.rstrip("/")
        base = self._path(prefix) if prefix else self.root

        def op() -> list[str]:
            if not base.is_dir():
                return []
            keys = []
            for dirpath, _dirs, files in os.walk(base, onerror=_raise_unless_gone):
                for name in files:
                    if name.startswith(".tmp-"):
                        continue
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
            return sorted(keys)

        try:
            return self._retry("list", prefix or ".", op)
        except OSError as e:
            raise StoreError(f"cannot list {prefix or '.'} in {self.url}: {e.strerror}") from None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._retry("delete", key, lambda: path.unlink(missing_ok=True))
        except OSError as e:
            raise StoreError(f"cannot delete {key} in {self.url}: {e.strerror}") from None

    def read_into(self, key: str, buf: memoryview, chunk: int = 1 << 20) -> Iterator[memoryview]:
        """Read straight into `buf` in 1 MiB chunks: no intermediate bytes object, cache-hot hashing."""
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                pos = 0
                while n := f.readinto(buf[pos : pos + chunk]):
                    yield buf[pos : pos + n]
                    pos += n
                    if pos == len(buf) and f.read(1):
                        raise StoreError(f"{key} in {self.url} is larger than expected (changed while reading?)")
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} from {self.url}: {e.strerror}") from None


def _raise_unless_gone(e: OSError) -> None:
    """os.walk skips unreadable folders silently; a listing with holes would hide files."""
    if not isinstance(e, FileNotFoundError):
        raise e


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
