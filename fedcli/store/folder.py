"""A shared folder (local disk, NFS, SMB mount) as a store.

Atomicity: write to a temp file in the same folder, fsync, then rename (replace) or
hard-link (create-only: link fails if the target exists, so one racer wins).
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import AlreadyExists, NotFound, StoreError
from ..names import check_key
from .base import Store


class FolderStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} from {self.url}: {e.strerror}") from None

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        path = self._path(key)
        try:
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
        except OSError as e:
            raise StoreError(f"cannot write {key} to {self.url}: {e.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                keys.append(rel)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

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
