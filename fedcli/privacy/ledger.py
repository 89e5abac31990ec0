"""A bank's local privacy ledger: what it released, checked against its budget before an update leaves."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from fedcli.errors import ExitCode, FedcliError, InputError
from fedcli.privacy.accounting import ACCOUNTANT, Mechanism, epsilon


class BudgetExceeded(FedcliError):
    """Exporting would push the bank past its configured (epsilon, delta) budget."""

    exit_code = ExitCode.BUDGET
    reason = "budget"


class Ledger:
    """A bank's local privacy ledger: one JSON file, one entry per released update.

    Each entry: round, federation, mode, the mechanism's parameters, the delta used, the
    cumulative epsilon after it, and the time. Every release is charged, including a re-run
    of the same round (fresh noise on the same data is a second release). ``charge`` is
    meant to run *before* the update is exported: a crash afterwards over-counts, never
    under-counts. Writes are atomic (files.write_atomic) and serialised by a lock
    file, so overlapping cron runs cannot lose an entry.

    Composition covers every entry of the same mode in the file; update and record epsilons
    protect different units and are kept apart. A ledger is bound to one key and one federation
    (`owner`: key fingerprint, federation id, written into the file): another key's or another
    federation's file is refused, so pointing --ledger at a fresh or foreign file resets nothing
    unnoticed (bank.releases also cross-checks the ledger against the bank's signed updates on
    the store). `legacy`: a ledger of the layout before per-federation folders, read (all its
    entries: over-counting, never under-counting) until this one is first written.
    """

    def __init__(
        self, path: str | os.PathLike, owner: tuple[str, str] | None = None, legacy: str | os.PathLike | None = None
    ):
        self.path = Path(path)
        self.owner = owner
        self.legacy = Path(legacy) if legacy is not None else None

    def entries(self) -> list[dict]:
        """Every release so far; a damaged ledger is refused, never read as an empty history."""
        from fedcli.contract import load_json, validate
        from fedcli.files import read_bounded
        from fedcli.localdocs import MAX_LEDGER_BYTES, LedgerFile

        path = self.path
        if not path.exists() and self.legacy is not None and self.legacy.is_file():
            path = self.legacy
        what = f"privacy ledger {path}"
        try:
            data = read_bounded(path, MAX_LEDGER_BYTES, "privacy ledger")
            if data is None:
                return []
            doc = validate(LedgerFile, load_json(data, what, MAX_LEDGER_BYTES, InputError), what, InputError)
        except FedcliError as e:
            raise InputError(
                f"{e}: it is unreadable, and fedcli refuses to guess what was spent; restore it from backup"
            ) from None
        self._check_owner(path, doc.key_fingerprint, doc.federation_id)
        return [e.model_dump() for e in doc.entries]

    def _check_owner(self, path: Path, fingerprint: str | None, federation: str | None) -> None:
        """A ledger written for another key or federation is not this one's history."""
        if self.owner is None:
            return
        for what, theirs, mine in zip(("key", "federation"), (fingerprint, federation), self.owner, strict=True):
            if theirs is not None and theirs != mine:
                raise InputError(
                    f"privacy ledger {path} belongs to {what} {theirs}, not {mine}: it is not this bank's "
                    "history in this federation (--ledger names another file; without it fedcli picks the right one)"
                )

    def mechanisms(self, mode: str) -> list[Mechanism]:
        return [Mechanism.from_dict(e) for e in self.entries() if e.get("mode") == mode]

    def spent(self, mode: str, delta: float) -> float:
        """Epsilon spent so far in ``mode`` at ``delta``, composed over the whole history."""
        return epsilon(self.mechanisms(mode), delta)

    def summary(self) -> list[dict]:
        """Per mode: releases, epsilon spent now and the budget, at the latest entry's delta."""
        rows = []
        for mode in ("update", "record"):
            entries = [e for e in self.entries() if e.get("mode") == mode]
            if entries:
                last = entries[-1]
                rows.append(
                    {
                        "mode": mode,
                        "releases": len(entries),
                        "delta": last["delta"],
                        "epsilon": self.spent(mode, last["delta"]),
                        "budget_epsilon": last["budget_epsilon"],
                    }
                )
        return rows

    def check(self, mech: Mechanism, budget_epsilon: float, delta: float) -> float:
        """Epsilon after also releasing ``mech``; raises BudgetExceeded if over budget."""
        history = self.mechanisms(mech.mode)
        after = epsilon([*history, mech], delta)
        if after > budget_epsilon:
            before = epsilon(history, delta)
            raise BudgetExceeded(
                f"privacy budget exceeded: exporting would bring {mech.mode}-level epsilon from "
                f"{before:.3g} to {after:.3g} (budget {budget_epsilon:g} at delta={delta:g}); update not exported"
            )
        return after

    def charge(
        self,
        mech: Mechanism,
        *,
        round: int,
        federation: str,
        budget_epsilon: float,
        delta: float,
        release: str | None = None,
    ) -> dict:
        """Check the budget and append the release to the ledger, atomically; returns the entry.
        `release`: what it is when not a round's update ("evaluation": a holdout evaluation of global `round`)."""
        return self._append(mech, round, federation, budget_epsilon, delta, release, enforce=True)

    def record(
        self,
        mech: Mechanism,
        *,
        round: int,
        federation: str,
        budget_epsilon: float,
        delta: float,
        release: str | None = None,
    ) -> dict:
        """Append a release that already happened (recovery from the store), whatever the budget says."""
        return self._append(mech, round, federation, budget_epsilon, delta, release, enforce=False)

    def _append(
        self,
        mech: Mechanism,
        round: int,
        federation: str,
        budget_epsilon: float,
        delta: float,
        release: str | None,
        enforce: bool,
    ) -> dict:
        with self._locked():
            after = (
                self.check(mech, budget_epsilon, delta)
                if enforce
                else epsilon([*self.mechanisms(mech.mode), mech], delta)
            )
            entry = _entry(mech, round, federation, delta, after, budget_epsilon)
            if release is not None:
                entry["release"] = release
            self._write([*self.entries(), entry])
        return entry

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: list[dict]) -> None:
        """Validated against the ledger's contract, then written atomically (files.write_atomic)."""
        from fedcli.files import write_atomic
        from fedcli.localdocs import LedgerFile

        owner = {} if self.owner is None else {"key_fingerprint": self.owner[0], "federation_id": self.owner[1]}
        doc = LedgerFile.model_validate({"version": 1, "accountant": ACCOUNTANT, "entries": entries, **owner})
        write_atomic(self.path, json.dumps(doc.model_dump(exclude_none=True), indent=2).encode(), self.path.name + ".")


def _entry(mech: Mechanism, round_: int, federation: str, delta: float, after: float, budget_epsilon: float) -> dict:
    """One ledger entry: the mechanism as run, and the epsilon after composing it."""
    return {
        "round": int(round_),
        "federation": federation,
        "mode": mech.mode,
        "noise_multiplier": float(mech.noise_multiplier),
        "sample_rate": float(mech.sample_rate),
        "steps": int(mech.steps),
        "clip": float(mech.clip),
        "delta": float(delta),
        "epsilon_after": float(after),
        "budget_epsilon": float(budget_epsilon),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
