"""A shared folder (local disk, NFS, SMB mount) as a store.

Atomicity: fedcli.files.atomic_write_at, the core of every atomic write: a temp file in the
same folder, fsync, then rename (replace) or hard-link (create-only: link fails if the target
exists, so one racer wins). What differs from a local file is around it: the folder is
reached link by link, the write is retried, and the folder fsync is best effort.
Transient errors of network file systems (EIO, ESTALE, timeouts...) are retried with
back-off; anything else (permission, disk full) fails at once with one clear line.

Links: anyone who can write to the shared folder could plant a symbolic link (to a private
key, a customer table, or a folder outside the store). So every path is walked one
component at a time from the store root, each folder opened with O_NOFOLLOW relative to
its parent's descriptor, and only regular files are read; a link, a FIFO or a folder where
a file belongs is refused with `NotRegular` (exit 4). Writes happen inside the folder
descriptor reached that way, so a linked `rounds/N` can never redirect a write outside.
The store root itself may be reached through a link: it is resolved once, when opened.
`list` never descends into a linked folder; it reports links and special files as keys so
that any reader of them (get, size, exists, read_into) is refused out loud instead of them
going unnoticed. `delete` of a link removes the link itself.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from fedcli import files
from fedcli.errors import AlreadyExists, FedcliError, InputError, NotFound, NotRegular, Oversize, StoreError
from fedcli.names import check_key
from fedcli.store import retry
from fedcli.store.base import Store
from fedcli.store.retry import RetryPolicy, with_retry

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
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a planted FIFO must not wait for a writer; it is refused after fstat.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def is_transient(e: BaseException) -> bool:
    """True for OS errors a network mount produces while it recovers."""
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


class FolderStore(Store):
    def __init__(self, root: str | os.PathLike, *, policy: RetryPolicy | None = None):
        self.root = Path(root).expanduser().resolve()  # the one place a link is followed: the root itself
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{root} is a file, not a store folder: give the shared folder (or s3://bucket/prefix)")
        self.policy = policy or retry.DEFAULT_POLICY  # looked up now, so tests and tools can tune it

    def _retry(self, what: str, key: str, op: Callable[[], T]) -> T:
        return with_retry(op, what=f"{what} {key} in {self.url}", transient=is_transient, policy=self.policy)

    # -- walking without following links ---------------------------------------------

    def _not_regular(self, where: str, mode: int, folder: bool = False) -> NotRegular:
        if folder:
            return NotRegular(
                f"{where} in {self.url} is {_kind(mode)}; a store folder must be a real folder: refusing to follow it"
            )
        verb = "follow" if stat.S_ISLNK(mode) else "read"
        return NotRegular(
            f"{where} in {self.url} is {_kind(mode)}; a store path must be a regular file: refusing to {verb} it"
        )

    @contextmanager
    def _folder(self, parts: list[str], create: bool = False) -> Iterator[int]:
        """A descriptor of the folder root/parts, reached without following any link.

        Missing folders raise FileNotFoundError, or are made when `create`; a link or special
        file on the way raises NotRegular; a regular file there raises the OSError (ENOTDIR).
        """
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            for i, name in enumerate(parts):
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass  # a racer made it
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                            raise self._not_regular("/".join(parts[: i + 1]), mode, folder=True) from None
                    raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _open_file(self, key: str, dir_fd: int, name: str) -> int:
        """Open a regular file for reading, never following a link nor blocking on a FIFO."""
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):  # refused before open: opening a device can have effects
            raise self._not_regular(key, mode)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a link since the check
                raise self._not_regular(key, stat.S_IFLNK) from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise self._not_regular(key, mode)
        return fd

    @contextmanager
    def _reading(self, key: str) -> Iterator[int]:
        parts = check_key(key).split("/")
        with self._folder(parts[:-1]) as dir_fd:
            fd = self._open_file(key, dir_fd, parts[-1])
        try:
            yield fd
        finally:
            os.close(fd)

    # -- Store interface ---------------------------------------------------------------

    def get(self, key: str, *, max_bytes: int) -> bytes:
        def op() -> bytes:
            with self._reading(key) as fd:
                size = os.fstat(fd).st_size
                if size > max_bytes:
                    raise Oversize(
                        f"{key} in {self.url} is {size:,} bytes, more than the {max_bytes:,} allowed; not read"
                    )
                chunks, total = [], 0
                while total <= max_bytes and (chunk := os.read(fd, min(max_bytes + 1 - total, 1 << 24) or 1)):
                    chunks.append(chunk)
                    total += len(chunk)
            if total > max_bytes:
                raise Oversize(f"{key} in {self.url} grew past the {max_bytes:,} bytes allowed while reading; not read")
            return b"".join(chunks)

        return self._guard("read", key, op)

    def _guard(self, what: str, key: str, op: Callable[[], T]) -> T:
        """Retry op; a missing path becomes NotFound, other OS errors one StoreError line."""
        check_key(key)
        try:
            return self._retry(what, key, op)
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            prep = "from" if what == "read" else "in"
            raise StoreError(f"cannot {what} {key} {prep} {self.url}: {e.strerror}") from None

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        parts = check_key(key).split("/")
        tries = 0

        def op() -> None:
            nonlocal tries
            tries += 1
            with self._folder(parts[:-1], create=True) as dir_fd:
                self._put_once(key, dir_fd, parts[-1], data, create_only)

        try:
            self._retry("write", key, op)
        except AlreadyExists:
            # A retried link may have landed the first time: our bytes there means success.
            if tries > 1 and self._same(key, data):
                return
            raise
        except OSError as e:
            raise StoreError(f"cannot write {key} to {self.url}: {e.strerror}") from None

    def _put_once(self, key: str, dir_fd: int, name: str, data: bytes, create_only: bool) -> None:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(mode):
                raise self._not_regular(key, mode)
            if create_only:
                raise AlreadyExists(f"{key} already exists in {self.url}")
        try:
            with files.atomic_write_at(dir_fd, name, ".tmp-", create_only=create_only) as f:
                f.write(data)
        except FileExistsError:
            raise AlreadyExists(f"{key} already exists in {self.url}") from None
        # The folder fsync is best effort here, unlike files.write_atomic: some file systems a
        # share is mounted with refuse fsync on a folder (EINVAL), and the file's own fsync
        # already passed; failing a write that landed would only make the caller retry it.
        try:
            os.fsync(dir_fd)
        except OSError:
            pass

    def _same(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key, max_bytes=len(data)) == data
        except FedcliError:
            return False

    def _lstat(self, key: str) -> os.stat_result:
        parts = check_key(key).split("/")
        with self._folder(parts[:-1]) as dir_fd:
            return os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)

    def exists(self, key: str) -> bool:
        """True for a regular file, False for nothing; a link or anything else there is refused.

        Why refuse rather than answer: callers decide from this whether something was already
        written ("already submitted"), so a planted link must not count as a file nor as absent.
        """

        def op() -> bool:
            try:
                mode = self._lstat(key).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return False
            if not stat.S_ISREG(mode):
                raise self._not_regular(key, mode)
            return True

        # An I/O error must not read as "absent": callers decide what to write from this.
        return self._guard("inspect", key, op)

    def size(self, key: str) -> int:
        def op() -> int:
            st = self._lstat(key)
            if not stat.S_ISREG(st.st_mode):
                raise self._not_regular(key, st.st_mode)
            return st.st_size

        return self._guard("inspect", key, op)

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.rstrip("/")
        parts = check_key(prefix).split("/") if prefix else []

        def op() -> list[str]:
            keys: list[str] = []
            try:
                with self._folder(parts) as fd:
                    _walk(fd, prefix, keys)
            except (FileNotFoundError, NotADirectoryError):
                return []
            return sorted(keys)

        try:
            return self._retry("list", prefix or ".", op)
        except OSError as e:
            raise StoreError(f"cannot list {prefix or '.'} in {self.url}: {e.strerror}") from None

    def delete(self, key: str) -> None:
        """Remove key if present; a link there is removed itself, never what it points to."""
        parts = check_key(key).split("/")

        def op() -> None:
            try:
                with self._folder(parts[:-1]) as dir_fd:
                    os.unlink(parts[-1], dir_fd=dir_fd)
            except (FileNotFoundError, NotADirectoryError):
                pass

        try:
            self._retry("delete", key, op)
        except OSError as e:
            raise StoreError(f"cannot delete {key} in {self.url}: {e.strerror}") from None

    def read_into(self, key: str, buf: memoryview, chunk: int = 1 << 20) -> Iterator[memoryview]:
        """Read straight into `buf` in 1 MiB chunks: no intermediate bytes object, cache-hot hashing."""
        check_key(key)
        try:
            with self._reading(key) as fd:
                pos = 0
                while n := os.readv(fd, [buf[pos : pos + chunk]]) if pos < len(buf) else 0:
                    yield buf[pos : pos + n]
                    pos += n
                if os.read(fd, 1):
                    raise StoreError(f"{key} in {self.url} is larger than expected (changed while reading?)")
        except FileNotFoundError:
            raise NotFound(f"{key} not found in {self.url}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key} from {self.url}: {e.strerror}") from None


def _walk(fd: int, rel: str, keys: list[str]) -> None:
    """Collect keys below the folder fd; descend only into real folders, never a link."""
    with os.scandir(fd) as entries:
        found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in found:
        key = f"{rel}/{name}" if rel else name
        try:
            check_key(key)
        except FedcliError:
            continue  # temp files, hidden and odd names: never a key fedcli reads
        if not is_dir:
            keys.append(key)  # files, and links or special files that any reader then refuses
            continue
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            continue  # removed while listing
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                keys.append(key)  # swapped for a link or file while listing: readers refuse it
                continue
            raise  # a listing with holes would hide files
        try:
            _walk(child, key, keys)
        finally:
            os.close(child)
