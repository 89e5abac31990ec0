"""A party's own record of the spec chain: the newest version it verified (forks and rollback).

The store alone cannot show a fork: someone holding a coordinator key (or write access and an old
key) can delete versions or publish another version K. Each party therefore keeps, next to its key,
the newest version it verified and its SHA-256, and refuses a store whose chain is shorter or differs
there. Banks keep NAME.state.chain.json (next to their state file, with the version whose policy
they agreed to: bank.pinning); the coordinator keeps NAME.chain.json next to its key, so it never
aggregates or amends on a rolled-back chain (amending there would fork it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from fedcli.contract import strict_config
from fedcli.errors import FedcliError, InputError, VerificationError
from fedcli.protocol.chain import Chain

MAX_POSITION_BYTES = 4096
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Number = Annotated[int, Field(ge=1, le=999_999)]


class ChainPositionFile(BaseModel):
    """The newest spec version this party verified, and (a bank) the one whose policy it agreed to."""

    model_config = strict_config()

    federation_id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    version: Number
    sha256: Sha256
    policy_version: Number | None = None
    policy_sha256: Sha256 | None = None


def coordinator_position_path(key_path: Path) -> Path:
    return Path(key_path).with_suffix(".chain.json")


def load_position(path: Path) -> ChainPositionFile | None:
    from fedcli.contract import load_json, validate
    from fedcli.files import read_bounded

    what = f"spec chain position file {path}"
    try:
        data = read_bounded(Path(path), MAX_POSITION_BYTES, what)
        if data is None:
            return None
        return validate(ChainPositionFile, load_json(data, what, MAX_POSITION_BYTES, InputError), what, InputError)
    except FedcliError as e:
        raise InputError(f"{e}; restore it from backup") from None


def save_position(path: Path, doc: ChainPositionFile) -> None:
    from fedcli.files import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)  # a bank's per-federation folder is made on first use
    write_atomic(Path(path), json.dumps(doc.model_dump(exclude_none=True), indent=2).encode(), ".chain-")


def check_position(walked: Chain, pos: ChainPositionFile, federation_id: str) -> None:
    """The versions this party trusted must still be on the chain, unchanged."""
    if pos.federation_id != federation_id:
        raise VerificationError(
            f"this key's spec chain position belongs to federation {pos.federation_id}, the store holds {federation_id}"
        )
    seen = [(pos.version, pos.sha256)]
    if pos.policy_version is not None and pos.policy_sha256 is not None:
        seen.append((pos.policy_version, pos.policy_sha256))
    for number, sha in seen:
        found = walked.version(number)
        if found is None:
            raise VerificationError(
                f"rollback: the store's spec chain ends at version {walked.latest.number}, "
                f"but this key already trusted version {number}",
                reason="rollback",
            )
        if found.sha != sha:
            raise VerificationError(
                f"spec version {number} on the store is not the one this key trusted "
                "(a fork or a rewritten spec): refusing to trust this store",
                reason="rollback",
            )


def hold(walked: Chain | None, path: Path) -> None:
    """Check the chain against this party's record, then record its newest version (the coordinator's use)."""
    if not isinstance(walked, Chain):
        return
    federation_id = walked.latest.spec.federation_id
    pos = load_position(path)
    if pos is not None:
        check_position(walked, pos, federation_id)
    latest = walked.latest
    if pos is None or latest.number > pos.version:
        save_position(path, ChainPositionFile(federation_id=federation_id, version=latest.number, sha256=latest.sha))


def record(path: Path, federation_id: str, number: int, sha: str) -> None:
    """This party just published version `number` (complete): it trusts it from now on."""
    save_position(path, ChainPositionFile(federation_id=federation_id, version=number, sha256=sha))
