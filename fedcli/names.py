"""Validation of names that become parts of store paths, so none can escape the store."""

import re

from .errors import FedcliError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(name: str, what: str = "name") -> str:
    """Return name if it is a safe member/federation id, else raise with the rule spelled out."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise FedcliError(
            f"invalid {what} {name!r}: use 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
        )
    return name


def check_key(key: str) -> str:
    """Return a store key (relative posix path) if every part is plain, else raise."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FedcliError(f"invalid store path {key!r}")
    for p in parts:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", p):
            raise FedcliError(f"invalid store path {key!r}")
    return key
