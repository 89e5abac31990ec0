"""One exception type the CLI turns into a one-line message and a cron-friendly exit code."""

# Exit codes: cron and schedulers branch on these.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # typer's own code for bad arguments
EXIT_WAITING = 3  # aggregate: quorum not reached yet, try again later
EXIT_VERIFY = 4  # a signature, hash or chain check failed: do not trust the store
EXIT_STORE = 5  # the store could not be reached or written after retries
EXIT_BUDGET = 6  # train: exporting would exceed the privacy budget


class FedcliError(Exception):
    """An expected failure with a message fit for the user and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class VerificationError(FedcliError):
    """Something signed or hashed did not check out."""

    exit_code = EXIT_VERIFY


class StoreError(FedcliError):
    """The store is unreachable or refused a write."""

    exit_code = EXIT_STORE


class AlreadyExists(StoreError):
    """A create-only write found the key already there (someone else won the race)."""

    exit_code = EXIT_ERROR


class NotFound(StoreError):
    """The key is not in the store."""

    exit_code = EXIT_ERROR
