"""Local files written and read safely: the one atomic writer and the one bounded reader.

Why one: a bank's state file is its defence against a rolled-back store, its ledger its record
of privacy spent; every file fedcli writes whole goes through the same temp file, fsync,
rename, folder fsync, so a crash leaves the old file or the new one, whole. The folder store
writes through the same core (`atomic_write_at`), inside a folder descriptor it reached
without following links.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_EXCL | O_NOFOLLOW: the temp name is fresh; a file or link planted there is never written through.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC


@contextlib.contextmanager
def atomic_write_at(dir_fd: int, name: str, prefix: str, *, create_only: bool = False) -> Iterator[IO[bytes]]:
    """The core: yield a temp file in the folder ``dir_fd``; when the block ends, fsync it and put it at ``name``.

    Replace by rename, or, with ``create_only``, by hard link, which fails with FileExistsError
    when ``name`` exists, so of two racers exactly one wins. The temp file (mode 0600) is
    removed whatever happens. Fsyncing the folder is left to the caller (see write_atomic),
    because a network store must decide what a refused folder fsync means.
    """
    tmp = f"{prefix}{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if create_only:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        else:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)


@contextlib.contextmanager
def atomic_writer(path: Path, prefix: str) -> Iterator[IO[bytes]]:
    """Yield a file to write ``path`` through: temp file, fsync, rename, fsync the folder.

    For writers that stream (a bundle's tar); ``write_atomic`` is the same for bytes in hand.
    """
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        with atomic_write_at(dir_fd, path.name, prefix) as f:
            yield f
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: bytes, prefix: str) -> None:
    """Temp file, fsync, rename, fsync the folder: a crash leaves the old file or the new one, whole."""
    with atomic_writer(path, prefix) as f:
        f.write(data)


def read_bounded(path: Path, max_bytes: int, what: str, error=None) -> bytes | None:
    """A local file's bytes, refused before reading when larger than max_bytes; None if it is absent."""
    from fedcli.contract import check_size
    from fedcli.errors import InputError

    error = error or InputError
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{what} {path} is not a regular file")
            check_size(st.st_size, max_bytes, f"{what} {path}", error)
            data = f.read(max_bytes + 1)
        check_size(len(data), max_bytes, f"{what} {path}", error)
        return data
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
