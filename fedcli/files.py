"""Local files written and read safely: the one atomic writer and the one bounded reader.

Why one: a bank's state file is its defence against a rolled-back store, its ledger its record
of privacy spent; every local file fedcli writes goes through the same temp file, fsync,
rename, folder fsync, so a crash leaves the old file or the new one, whole.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, prefix: str) -> None:
    """Temp file, fsync, rename, fsync the folder: a crash leaves the old file or the new one, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
