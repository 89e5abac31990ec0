"""What the coordinator keeps next to its key: every round it published (number and global sha256).

Why: the store is writable by others. If a published round's manifest is deleted, the store
looks as if round N was never published, and a coordinator that trusted the store alone would
sign a *second, different* round N; banks that saw the first would refuse the store forever.
With this file the coordinator refuses instead (exit 4, one line) and never signs a round number
twice. Kept per federation like a bank's state: `<key dir>/<key stem>.fedcli/<federation id>/
coordinator.json`, or under FEDCLI_HOME. A damaged file is refused, never read as empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from fedcli.bank.state import folder_for, key_hex
from fedcli.contract import strict_config
from fedcli.errors import FedcliError, InputError, VerificationError
from fedcli.localdocs import Name, Round, Sha256

MAX_COORDINATOR_STATE_BYTES = 64 << 20  # ~500,000 rounds


class PublishedRound(BaseModel):
    model_config = strict_config()

    round: Round
    sha256: Sha256


class CoordinatorStateFile(BaseModel):
    """coordinator.json: the rounds this coordinator signed, and the end if it signed one."""

    model_config = strict_config()

    version: Literal[1] = 1
    federation_id: Name
    published: Annotated[list[PublishedRound], Field(max_length=1_000_000)] = []
    final_round: Round | None = None
    final_reason: Literal["rounds", "budget"] | None = None


class CoordinatorState:
    """The rounds this coordinator published in one federation, as a dict round -> global sha256."""

    def __init__(self, path: Path, federation_id: str):
        self.path = Path(path)
        self.federation_id = federation_id
        self.published: dict[int, str] = {}
        self.final: tuple[int, str] | None = None  # (round, reason)

    @classmethod
    def for_key(cls, key_path: Path, pub_b64: str, federation_id: str) -> CoordinatorState:
        path = folder_for(key_path, key_hex(pub_b64), federation_id) / "coordinator.json"
        state = cls(path, federation_id)
        state._load()
        return state

    def _load(self) -> None:
        from fedcli.contract import load_json, validate
        from fedcli.files import read_bounded

        what = f"coordinator state file {self.path}"
        try:
            data = read_bounded(self.path, MAX_COORDINATOR_STATE_BYTES, "coordinator state file")
            if data is None:
                return
            raw = load_json(data, what, MAX_COORDINATOR_STATE_BYTES, InputError)
            doc = validate(CoordinatorStateFile, raw, what, InputError)
        except FedcliError as e:
            raise InputError(f"{e}; restore it from backup") from None
        if doc.federation_id != self.federation_id:
            raise InputError(f"{what} belongs to federation {doc.federation_id}, not {self.federation_id}")
        self.published = {p.round: p.sha256 for p in doc.published}
        if doc.final_round is not None and doc.final_reason is not None:
            self.final = (doc.final_round, doc.final_reason)

    def check_store(self, latest: int, latest_sha: str) -> None:
        """Refuse a store whose newest global is older than, or different from, what this coordinator published."""
        if not self.published:
            return
        top = max(self.published)
        if latest < top:
            raise VerificationError(
                f"this coordinator published round {top} (global sha256 {self.published[top][:12]}…), but the "
                f"store's newest global is round {latest}: a published manifest was deleted or the store was rolled "
                f"back; restore it (state file {self.path}); round {latest + 1} is never signed twice",
                reason="rollback",
            )
        known = self.published.get(latest)
        if known is not None and known != latest_sha:
            raise VerificationError(
                f"the store's global of round {latest} is not the one this coordinator published "
                f"(state file {self.path})",
                reason="rollback",
            )

    def refuse_twice(self, r: int) -> None:
        """The last word before signing round r."""
        if r in self.published:
            raise VerificationError(
                f"round {r} was already published by this coordinator (global sha256 {self.published[r][:12]}…): "
                f"it is never signed twice (state file {self.path})",
                reason="rollback",
            )

    def record(self, r: int, sha: str) -> None:
        """Remember a published round (also one found on the store, signed by this key, after a crash)."""
        if self.published.get(r) == sha:
            return
        self.published[r] = sha
        self._save()

    def start_over(self, round0_sha: str | None) -> None:
        """`fedcli init` (the coordinator's deliberate act, never a store's): the history restarts at round 0
        (or before it, while a federated statistics round is pending)."""
        self.published, self.final = ({0: round0_sha} if round0_sha else {}), None
        self._save()

    def record_final(self, r: int, reason: str) -> None:
        if self.final == (r, reason):
            return
        self.final = (r, reason)
        self._save()

    def _save(self) -> None:
        from fedcli.files import write_atomic

        doc = CoordinatorStateFile(
            federation_id=self.federation_id,
            published=[PublishedRound(round=r, sha256=s) for r, s in sorted(self.published.items())],
            final_round=self.final[0] if self.final else None,
            final_reason=self.final[1] if self.final else None,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(doc.model_dump(exclude_none=True), indent=1).encode(), ".coordinator-")
