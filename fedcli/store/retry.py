"""Bounded retry with exponential back-off, shared by every store backend.

Why: shared folders (NFS/SMB) and object stores have short outages. A cron job should ride
them out for a few seconds, say so in the log, and then fail with one clear `StoreError`
(exit code 5) instead of a traceback; it never retries forever.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fedcli.errors import StoreError

log = logging.getLogger("fedcli.store")
T = TypeVar("T")
_jitter = secrets.SystemRandom()


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: waits grow base, 2*base, 4*base... up to cap, with jitter."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based); 50-100% of the step."""
        step = min(self.cap, self.base * 2 ** (attempt - 1))
        return step * (0.5 + _jitter.random() / 2)


DEFAULT_POLICY = RetryPolicy()


def with_retry(
    op: Callable[[], T],
    *,
    what: str,
    transient: Callable[[BaseException], bool],
    policy: RetryPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `op`; on a transient error wait and try again, at most `policy.attempts` times.

    Non-transient errors pass through untouched (the backend already turned them into
    FedcliErrors). When the attempts run out, raise StoreError naming the operation and
    the last error.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return op()
        except Exception as e:
            if not transient(e):
                raise
            if attempt == policy.attempts:
                raise StoreError(f"{what}: store still failing after {policy.attempts} attempts: {describe(e)}") from e
            wait = policy.delay(attempt)
            log.warning(
                "%s failed (%s); retrying in %.1fs (attempt %d of %d)",
                what,
                describe(e),
                wait,
                attempt + 1,
                policy.attempts,
            )
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def describe(e: BaseException) -> str:
    """One line for an exception: its message, or its type when it has none."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
