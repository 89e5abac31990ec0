"""What a bank keeps next to its key: the last global it trusted (rollback defence) and where its ledger lives."""

import json
from dataclasses import dataclass
from pathlib import Path

from fedcli.errors import FedcliError, InputError, VerificationError
from fedcli.protocol import rounds


@dataclass
class BankState:
    """What this bank last saw, kept next to its key: the defence against a rolled-back store.

    A typed document (localdocs.BankStateFile); a damaged one is refused, never read as empty,
    because an empty state would accept any rolled-back store.
    """

    path: Path
    federation_id: str | None = None
    last_round: int = -1
    last_sha256: str | None = None

    @classmethod
    def load(cls, path: Path) -> "BankState":
        from fedcli.contract import load_json, validate
        from fedcli.files import read_bounded
        from fedcli.localdocs import MAX_STATE_BYTES, BankStateFile

        what = f"bank state file {path}"
        try:
            data = read_bounded(Path(path), MAX_STATE_BYTES, "bank state file")
            if data is None:
                return cls(path)
            doc = validate(BankStateFile, load_json(data, what, MAX_STATE_BYTES, InputError), what, InputError)
        except FedcliError as e:
            raise InputError(f"{e}; restore it from backup") from None
        return cls(path, doc.federation_id, doc.last_round, doc.last_sha256)

    def check(self, federation_id: str, g: rounds.Global) -> None:
        """Refuse a global model older than, or different from, one we already trusted."""
        if self.federation_id not in (None, federation_id):
            raise VerificationError(
                f"this key's state belongs to federation {self.federation_id}, the store holds {federation_id}"
            )
        if g.round < self.last_round:
            raise VerificationError(
                f"rollback: the store's latest global is round {g.round}, but this bank already saw round {self.last_round}",
                reason="rollback",
            )
        if g.round == self.last_round and g.sha256 != self.last_sha256:
            raise VerificationError(
                f"the global model of round {g.round} changed since this bank last saw it", reason="rollback"
            )
        if g.round == self.last_round + 1 and self.last_sha256 and g.manifest.get("prev_sha256") != self.last_sha256:
            raise VerificationError(
                f"the global model of round {g.round} does not chain to round {self.last_round}", reason="rollback"
            )

    def save(self, federation_id: str, g: rounds.Global) -> None:
        from fedcli.files import write_atomic
        from fedcli.localdocs import BankStateFile

        doc = BankStateFile(federation_id=federation_id, last_round=g.round, last_sha256=g.sha256)
        write_atomic(Path(self.path), json.dumps(doc.model_dump(), indent=2).encode(), ".state-")
        self.federation_id, self.last_round, self.last_sha256 = federation_id, g.round, g.sha256


def state_path_for(key_path: Path) -> Path:
    return Path(key_path).with_suffix(".state.json")


def ledger_path_for(key_path: Path) -> Path:
    return Path(key_path).with_suffix(".ledger.json")
