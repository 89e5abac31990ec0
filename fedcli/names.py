"""Validation of names that become parts of store paths, so none can escape the store.

`check_key` is the gate every store backend passes each key through: relative, no empty,
'.' or '..' part, each part plain ASCII starting with a letter or digit. fullmatch, not
match: `$` would also accept a trailing newline.
"""

import re

from fedcli.errors import FedcliError

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_KEY = 1024


def check_name(name: str, what: str = "name") -> str:
    """Return name if it is a safe member/federation id, else raise with the rule spelled out."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FedcliError(
            f"invalid {what} {name!r}: use 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )
    return name


def check_key(key: str) -> str:
    """Return a store key (relative posix path) if every part is plain, else raise."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise FedcliError(f"invalid store path {key!r}"[:200])
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") or not _PART.fullmatch(p) for p in parts):
        raise FedcliError(f"invalid store path {key!r}"[:200])
    return key
