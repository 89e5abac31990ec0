"""What a bank keeps per federation: the last global it trusted (rollback defence), its ledger, its residual.

Where: `<key dir>/<key stem>.fedcli/<federation id>/` (state.json, ledger.json, the compression
residual), or `$FEDCLI_HOME/<key fingerprint>/<federation id>/` when FEDCLI_HOME is set. Chosen
from the key and the signed spec's federation id, so one key serves several federations without
a flag, and the same federation on another store (`fedcli store copy`) finds the same state.
`--state` / `--ledger` still choose a file by hand. The layout before per-federation folders
(`<key>.state.json`, `<key>.ledger.json`) is still read: once, for the federation it names.
"""

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedcli.errors import FedcliError, InputError, VerificationError
from fedcli.protocol import rounds

HOME_ENV = "FEDCLI_HOME"


@dataclass(frozen=True)
class BankFiles:
    """The files a bank keeps for one federation, and where an older fedcli kept them."""

    state: Path
    ledger: Path
    legacy_state: Path | None  # read when `state` does not exist yet
    legacy_ledger: Path | None
    state_flag: bool  # the state file was given with --state


def key_hex(pub_b64: str) -> str:
    """The key's fingerprint without spaces: a folder name under FEDCLI_HOME."""
    from fedcli import keys

    return keys.fingerprint(keys.unb64(pub_b64)).replace(" ", "")


def folder_for(key_path: Path, key_hex: str, federation_id: str) -> Path:
    """This key's folder for one federation: under FEDCLI_HOME when set, else next to the key."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home) / key_hex / federation_id
    key_path = Path(key_path)
    return key_path.parent / f"{key_path.stem}.fedcli" / federation_id


def bank_files(
    key_path: Path, key_hex: str, federation_id: str, state: Path | None = None, ledger: Path | None = None
) -> BankFiles:
    """The state and ledger files of this key in this federation (explicit paths win)."""
    folder = folder_for(key_path, key_hex, federation_id)
    return BankFiles(
        state=Path(state) if state is not None else folder / "state.json",
        ledger=Path(ledger) if ledger is not None else folder / "ledger.json",
        legacy_state=None if state is not None else state_path_for(key_path),
        legacy_ledger=None if ledger is not None else ledger_path_for(key_path),
        state_flag=state is not None,
    )


def _flag_hint(files: BankFiles | None, path: Path) -> str:
    if files is None:
        return f"state file {path}"
    how = "given with --state" if files.state_flag else "chosen from the key and federation; --state picks another"
    return f"state file {path} ({how})"


@dataclass
class BankState:
    """What this bank last saw, kept per federation: the defence against a rolled-back store.

    A typed document (localdocs.BankStateFile); a damaged one is refused, never read as empty,
    because an empty state would accept any rolled-back store.
    """

    path: Path
    federation_id: str | None = None
    last_round: int = -1
    last_sha256: str | None = None
    files: BankFiles | None = None
    final_round: int | None = None  # this bank saw the coordinator's final marker for this round

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
            raise InputError(f"{e} (--state names another file); restore it from backup") from None
        return cls(path, doc.federation_id, doc.last_round, doc.last_sha256, final_round=doc.final_round)

    @classmethod
    def for_federation(cls, files: BankFiles, federation_id: str) -> "BankState":
        """This federation's state; an old-layout file is taken over when it names this federation."""
        state = cls.load(files.state)
        if not files.state.exists() and files.legacy_state is not None and files.legacy_state.exists():
            old = cls.load(files.legacy_state)
            if old.federation_id in (None, federation_id):
                state = cls(
                    files.state, old.federation_id, old.last_round, old.last_sha256, final_round=old.final_round
                )
        state.files = files
        return state

    def check(self, federation_id: str, g: rounds.Global) -> None:
        """Refuse a global model older than, or different from, one we already trusted."""
        where = _flag_hint(self.files, self.path)
        if self.federation_id not in (None, federation_id):
            raise VerificationError(
                f"{where} belongs to federation {self.federation_id}, the store holds {federation_id}"
            )
        moved = "; if the federation moved on purpose, copy it whole with `fedcli store copy` (docs/operations.md)"
        if g.round < self.last_round:
            raise VerificationError(
                f"rollback: the store's latest global is round {g.round}, but this bank already saw round "
                f"{self.last_round} ({where}){moved}",
                reason="rollback",
            )
        if g.round == self.last_round and g.sha256 != self.last_sha256:
            raise VerificationError(
                f"the global model of round {g.round} changed since this bank last saw it ({where})", reason="rollback"
            )
        if g.round == self.last_round + 1 and self.last_sha256 and g.manifest.get("prev_sha256") != self.last_sha256:
            raise VerificationError(
                f"the global model of round {g.round} does not chain to round {self.last_round} ({where})",
                reason="rollback",
            )

    def save(self, federation_id: str, g: rounds.Global) -> None:
        if g.round < self.last_round:
            return  # never move backwards (an older round was used on purpose, e.g. predict --round)
        self.federation_id, self.last_round, self.last_sha256 = federation_id, g.round, g.sha256
        self._write()

    def _write(self) -> None:
        from fedcli.files import write_atomic
        from fedcli.localdocs import BankStateFile

        doc = BankStateFile(
            federation_id=self.federation_id,
            last_round=self.last_round,
            last_sha256=self.last_sha256,
            final_round=self.final_round,
        )
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(self.path), json.dumps(doc.model_dump(exclude_none=True), indent=2).encode(), ".state-")

    def saw_final(self, federation_id: str, r: int) -> None:
        """Remember the signed end: a store that later lacks the marker is refused, not trained on."""
        if self.final_round != r:
            self.federation_id, self.final_round = federation_id, r
            self._write()

    def check_not_ended(self) -> None:
        """The store shows no final marker: refuse if this bank already saw one (it was deleted)."""
        if self.final_round is not None:
            raise VerificationError(
                f"this bank saw the coordinator's final marker (the federation ended at round {self.final_round}; "
                f"{_flag_hint(self.files, self.path)}), but the store no longer shows it: nothing trained",
                reason="rollback",
            )


def check_age(g: rounds.Global, max_round_age_hours: float | None) -> None:
    """Refuse a store whose newest global is older than the spec's max_round_age (frozen in the past)."""
    if not max_round_age_hours:
        return
    created = datetime.fromisoformat(g.manifest["created_at"])
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    age = datetime.now(UTC) - created
    if age > timedelta(hours=max_round_age_hours):
        raise VerificationError(
            f"the store's newest global (round {g.round}, published {g.manifest['created_at']}) is "
            f"{age.total_seconds() / 3600:.0f} hours old, more than the spec's max_round_age of "
            f"{max_round_age_hours:g} hours: the store may be frozen in the past",
            reason="rollback",
        )


def state_path_for(key_path: Path) -> Path:
    """The state file of the layout before per-federation folders (still read)."""
    return Path(key_path).with_suffix(".state.json")


def ledger_path_for(key_path: Path) -> Path:
    """The ledger file of the layout before per-federation folders (still read)."""
    return Path(key_path).with_suffix(".ledger.json")


def ledger_for_key(key_path: Path) -> Path:
    """`fedcli privacy --key`: this key's one ledger; with several federations, --ledger must choose."""
    from fedcli import keys

    pub = keys.load_private(key_path)[1] if os.environ.get(HOME_ENV) else ""
    folder = folder_for(key_path, key_hex(pub) if pub else "", "x").parent
    found = sorted(p for p in folder.glob("*/ledger.json") if p.is_file()) if folder.is_dir() else []
    if len(found) > 1:
        raise InputError(
            f"{key_path} has a privacy ledger in {len(found)} federations ("
            + ", ".join(p.parent.name for p in found)
            + f"): pass --ledger, e.g. --ledger {found[0]}"
        )
    return found[0] if found else ledger_path_for(key_path)
