"""A lease lock kept in the store itself, so overlapping cron runs on different hosts exclude each other.

Why a lease: a run that crashes never releases; its lease simply expires and the next
run takes over. Why generations: the store offers no compare-and-swap on an existing key,
only create-only puts. So the lock is a numbered sequence of small JSON records:

    locks/<name>/000000000001.json  {"state": "held", "owner": ..., "expires": ...}
    locks/<name>/000000000002.json  {"state": "free", ...}        (the release)
    locks/<name>/000000000003.json  {"state": "held", ...}        (the next run)

The record with the highest number says who holds the lock. To acquire, a run reads the
top record; if it is free or expired it create-only-puts number top+1. Exactly one racer
can create a given number, so exactly one takes over even from a stale lease. The top
record is never deleted (clean-up removes only numbers below the caller's own), so a
number can only be reused below the top; a racer that lands there sees a higher number
when it checks right after its write, withdraws, and reports the lock as held.

Records are unsigned (anyone who can write to the store can plant one), so a record is
trusted only as far as its contract (`LockRecord`; pydantic, imported only by the commands
that take the lock, never by `fedcli --help`): a record that is oversized, nested,
untyped, linked, or holds a lease further than 10 TTLs ahead (a planted lease to the year
9999) is treated as expired, with a warning: it can delay a round by one lease at most,
never stall it.

The lease is judged by wall clocks: keep the TTL well above clock skew between hosts and
renew during long runs. Publishing stays safe even if a lease runs out mid-run, because
the round manifest itself is written create-only: the lock saves duplicate work, the
create-only commit prevents a double publish.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeGuard

from pydantic import BaseModel, Field

from fedcli.contract import load_json, strict_config, validate
from fedcli.errors import AlreadyExists, ContractError, ExitCode, FedcliError, NotFound, NotRegular
from fedcli.names import check_name
from fedcli.store.base import Store

log = logging.getLogger("fedcli.store")
_RECORD = re.compile(r"^(\d{12})\.json$")
MAX_GEN = 10**12 - 1  # record names have 12 digits
DEFAULT_TTL = 30 * 60.0
MAX_RECORD_BYTES = 4096
MAX_LEASE_TTLS = 10  # a lease further ahead than this many TTLs is not one this code wrote
_KEEP = 2  # older records kept below one's own, for the audit trail
_MAX_SKIPS = 8  # record numbers blocked by planted non-files skipped before giving up
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class LockHeld(FedcliError):
    """Another live run holds the lock: not an error of this run, try again later."""

    exit_code = ExitCode.WAITING
    reason = "waiting"


class LockLost(FedcliError):
    """Our lease expired and another run took over; stop before publishing anything."""


Time = Annotated[float, Field(ge=0, le=1e11)]  # seconds since 1970, before the year 5000


class LockRecord(BaseModel):
    """One lock record: who holds (or freed) the lease and until when. Unsigned, so strictly checked."""

    model_config = strict_config()
    state: Literal["held", "free"]
    owner: Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")]  # a random token, hex
    host: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,255}$")]  # plain: it is shown to operators
    pid: Annotated[int, Field(ge=0, le=2**32)]
    at: Time
    expires: Time


def _when(t) -> str:
    try:
        return datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


class LeaseLock:
    """`with LeaseLock(store, "aggregate"):` runs the block while holding the lease."""

    def __init__(
        self,
        store: Store,
        name: str = "aggregate",
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
        max_lease: float | None = None,
    ):
        self.store = store
        self.name = check_name(name, "lock name")
        self.max_lease = float(max_lease) if max_lease is not None else None  # seconds: the spec's max_lease_minutes
        self.ttl = float(ttl) if self.max_lease is None else min(float(ttl), self.max_lease)
        self.clock = clock
        self.owner = secrets.token_hex(16)
        self.gen: int | None = None  # our record number while we hold the lock

    # -- records -----------------------------------------------------------------

    def _key(self, gen: int) -> str:
        return f"locks/{self.name}/{gen:012d}.json"

    def _gens(self) -> list[int]:
        gens = []
        for key in self.store.list(f"locks/{self.name}"):
            m = _RECORD.match(key.rsplit("/", 1)[-1])
            if m:
                gens.append(int(m.group(1)))
        return sorted(gens)

    def _read(self, gen: int) -> dict | None:
        """Record gen as a dict, None if absent, {} if it breaks its contract (treated as expired, never held)."""
        key = self._key(gen)
        try:
            raw = load_json(self.store.get(key, max_bytes=MAX_RECORD_BYTES), f"lock record {key}", MAX_RECORD_BYTES)
            rec = validate(LockRecord, raw, f"lock record {key}").model_dump()
            horizon = self.clock() + MAX_LEASE_TTLS * self.ttl
            if rec["expires"] > horizon:
                raise ContractError(
                    f"lock record {key}: lease until {_when(rec['expires'])} is more than "
                    f"{MAX_LEASE_TTLS} lease times ahead"
                )
            self._check_lease_length(key, rec)
            return rec
        except NotFound:
            return None
        except FedcliError as e:  # oversized, nested, malformed, linked...: never a live lease
            log.warning("ignoring the %s lock record as expired: %s", self.name, e)
            return {}

    def _check_lease_length(self, key: str, rec: dict) -> None:
        """A lease that runs further ahead than the spec's maximum is not one a fedcli run took: invalid, so it
        may be taken over (its `at` is not trusted: a planted record can say anything there)."""
        if self.max_lease is None:
            return
        if rec["expires"] > self.clock() + self.max_lease:
            raise ContractError(
                f"lock record {key}: lease until {_when(rec['expires'])} is longer than the spec's "
                f"max_lease_minutes ({self.max_lease / 60:g})"
            )

    def _record(self, state: str) -> bytes:
        now = self.clock()
        rec = {
            "state": state,
            "owner": self.owner,
            "host": _HOST_UNSAFE.sub("-", socket.gethostname())[:255] or "unknown",
            "pid": os.getpid(),
            "at": now,
            "expires": now + self.ttl if state == "held" else now,
        }
        return json.dumps(rec, sort_keys=True).encode()

    def _live(self, rec: dict | None) -> TypeGuard[dict]:
        """True if rec is a held lease that has not expired."""
        if not rec:
            return False
        return rec["state"] == "held" and rec["expires"] > self.clock()

    def _held_error(self, rec: dict) -> LockHeld:
        return LockHeld(
            f"another run holds the {self.name} lock on {self.store} (host {rec.get('host', '?')}, "
            f"pid {rec.get('pid', '?')}, lease until {_when(rec.get('expires'))}); try again later"
        )

    # -- protocol ----------------------------------------------------------------

    def acquire(self) -> LeaseLock:
        """Take the lock, taking over an expired lease; raise LockHeld if a live run has it."""
        for _ in range(3):
            gens = self._gens()
            top = gens[-1] if gens else 0
            rec = self._read(top) if top else None
            if self._live(rec) and rec.get("owner") != self.owner:
                raise self._held_error(rec)
            if rec and rec.get("state") == "held" and rec.get("owner") != self.owner:
                log.warning(
                    "taking over the %s lock: the lease of host %s pid %s expired at %s",
                    self.name,
                    rec.get("host", "?"),
                    rec.get("pid", "?"),
                    _when(rec.get("expires")),
                )
            if self._claim(top + 1):
                self._cleanup(below=top + 1 - _KEEP)
                return self
        gens = self._gens()
        rec = self._read(gens[-1]) if gens else None
        raise self._held_error(rec or {})

    def _claim(self, first: int) -> bool:
        """Create record `first` (or the next free number) as ours; True if it is now the top record.

        A number blocked by a planted folder (listings show no record there) is skipped, a few
        at most, so it cannot stall the lock.
        """
        for gen in range(first, first + _MAX_SKIPS + 1):
            if gen > MAX_GEN:
                raise ContractError(
                    f"the {self.name} lock on {self.store} has reached record number {gen - 1} (names have 12 "
                    f"digits): a planted record? When no run is active, remove locks/{self.name}/ and run again"
                )
            try:
                self.store.put(self._key(gen), self._record("held"), create_only=True)
                break
            except AlreadyExists:
                return False
            except NotRegular as e:
                log.warning("skipping lock record number %d: %s", gen, e)
        else:
            raise ContractError(
                f"the {self.name} lock on {self.store} has {_MAX_SKIPS + 1} records in a row that are not files: "
                f"when no run is active, remove locks/{self.name}/ and run again"
            )
        if any(g > gen for g in self._gens()):
            # We filled a number below the top (a cleaned-up one): not the holder.
            self.store.delete(self._key(gen))
            return False
        self.gen = gen
        return True

    def check(self) -> None:
        """Raise LockLost unless we still hold an unexpired lease; call before committing."""
        held = self._held()
        gens = self._gens()
        if gens and gens[-1] != held:
            raise LockLost(f"the {self.name} lock on {self.store} was taken over by another run")
        if not self._live(self._read(held)):
            raise LockLost(f"the {self.name} lock lease on {self.store} expired during this run")

    def renew(self) -> None:
        """Extend the lease by another TTL (a new record on top of ours)."""
        self.check()
        if not self._claim(self._held() + 1):
            raise LockLost(f"the {self.name} lock on {self.store} was taken over by another run")
        self._cleanup(below=self._held() - _KEEP)

    def _held(self) -> int:
        """The number of our record; LockLost if this run holds no lock."""
        if self.gen is None:
            raise LockLost(f"the {self.name} lock on {self.store} is not held by this run")
        return self.gen

    def release(self) -> None:
        """Mark the lock free. A run whose lease was taken over leaves the new holder alone."""
        if self.gen is None:
            return
        gen, self.gen = self.gen, None
        if gen >= MAX_GEN:  # no 12-digit number left for the release: the lease simply expires
            log.warning(
                "the %s lock has no record number left to release it; it expires at the end of its lease", self.name
            )
            return
        try:
            self.store.put(self._key(gen + 1), self._record("free"), create_only=True)
        except AlreadyExists:
            log.warning("the %s lock had already been taken over by another run", self.name)
            return
        except NotRegular as e:  # a planted non-file: our lease simply runs out
            log.warning("could not release the %s lock, it expires with its lease: %s", self.name, e)
            return
        self._cleanup(below=gen - _KEEP)

    def _cleanup(self, below: int) -> None:
        """Delete old records (never the top one: the caller holds a higher number)."""
        for g in self._gens():
            if g >= below:
                break
            self.store.delete(self._key(g))

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.release()
            return
        try:
            self.release()
        except FedcliError as e:  # the lease expires anyway; keep the original error
            log.warning("could not release the %s lock: %s", self.name, e)
