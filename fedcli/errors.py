"""Errors as data: every expected failure carries an exit code (for cron) and a reason code.

The CLI turns any FedcliError into one line and its exit code. The reason code is stable
text (`oversize`, `bad-signature`, `not-finite`, ...) that the coordinator writes into the
signed rejections list, so a bank or an auditor can tell why an update was refused without
parsing prose.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes: cron and schedulers branch on these."""

    OK = 0
    ERROR = 1  # bad input or a failed step; nothing was half-written
    USAGE = 2  # bad arguments (typer's own code)
    WAITING = 3  # aggregate: quorum not reached yet, or another run holds the lock; try later
    VERIFY = 4  # a signature, hash, chain or contract check failed: do not trust the store
    STORE = 5  # the store could not be reached or written after retries
    BUDGET = 6  # train: exporting would exceed the privacy budget (nothing exported)


# Reason codes: what went wrong, in a word a program can match on. Listed in docs/protocol.md.
REASONS = {
    "error": "a failure with no more specific code",
    "bad-input": "a file or value the user supplied is malformed or out of range",
    "bad-signature": "a signature does not verify with the expected key",
    "bad-hash": "bytes do not match the sha256 named in a signed document",
    "malformed": "a document does not match its contract (type, range, unknown key)",
    "too-deep": "a JSON or TOML document nests deeper than allowed",
    "oversize": "a file is larger than its bound allows",
    "not-finite": "a tensor or number is NaN or infinite",
    "not-member": "the signer is not enrolled in the federation",
    "wrong-round": "a document names another federation, round or member than its place",
    "stale-base": "an update was trained on another global model than the open round's",
    "weak-privacy": "an update declares weaker differential privacy than the spec requires",
    "missing": "a file that must exist is not there",
    "not-regular": "a store path is a symbolic link or not a regular file",
    "rollback": "the store shows an older or different history than already seen",
    "secagg": "a masked update does not fit the secure-aggregation round",
    "store": "the store is unreachable or refused an operation",
    "exists": "a create-only write found the key already there",
    "budget": "the privacy budget would be exceeded",
    "waiting": "not ready yet; try again later",
}


class FedcliError(Exception):
    """An expected failure with a message fit for the user, an exit code and a reason code."""

    exit_code: ExitCode = ExitCode.ERROR
    reason: str = "error"

    def __init__(self, message: str, exit_code: int | None = None, reason: str | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = ExitCode(exit_code)
        if reason is not None:
            self.reason = reason
        assert self.reason in REASONS, self.reason


class InputError(FedcliError):
    """A file or value the user supplied is malformed, out of range or of the wrong kind."""

    reason = "bad-input"


class VerificationError(FedcliError):
    """Something signed, hashed or bounded did not check out."""

    exit_code = ExitCode.VERIFY
    reason = "bad-signature"


class ContractError(VerificationError):
    """A document from the store does not match its contract (type, range, unknown key, depth, size)."""

    reason = "malformed"


class StoreError(FedcliError):
    """The store is unreachable or refused a write."""

    exit_code = ExitCode.STORE
    reason = "store"


class AlreadyExists(StoreError):
    """A create-only write found the key already there (someone else won the race)."""

    exit_code = ExitCode.ERROR
    reason = "exists"


class NotFound(StoreError):
    """The key is not in the store."""

    exit_code = ExitCode.ERROR
    reason = "missing"


class NotRegular(StoreError):
    """A store path is a symbolic link, a folder or a special file: never followed or read."""

    exit_code = ExitCode.VERIFY
    reason = "not-regular"


class Oversize(VerificationError):
    """A file is larger than its bound: refused before it is read."""

    reason = "oversize"


class Waiting(FedcliError):
    """Not an error of this run: try again later (cron treats exit 3 as normal)."""

    exit_code = ExitCode.WAITING
    reason = "waiting"
