"""Retry policies and the classification of errors into what happens next.

Three outcomes exist for an exception raised while a batch is applied:

- infrastructure: PostgreSQL or the network failed. The whole batch
  transaction is rolled back and retried with backoff, as often as it takes.
  Such an error never dead-letters a message, because the message is not at
  fault.
- permanent: decoding, validation, or a `PermanentError` from the handler.
  The message is dead-lettered at once.
- retriable: any other handler exception. The message is retried up to the
  policy's `max_attempts`, then dead-lettered.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

import asyncpg
import pydantic

from consumer import errors

__all__ = ["ErrorClass", "RetryPolicy", "classify"]

# SQLSTATE codes that mean "try the same transaction again": serialization
# failure, deadlock, lock timeout, and the server shutting down or killing the
# session (admin_shutdown, crash_shutdown, cannot_connect_now).
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "08000", "08003", "08006"})


class ErrorClass(enum.Enum):
    INFRASTRUCTURE = "infrastructure"
    PERMANENT = "permanent"
    RETRIABLE = "retriable"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how fast a failing message is retried before it is dead-lettered.

    The delay before attempt n+1 is ``initial_backoff_s * 2**(n-1)``, capped
    at `max_backoff_s`, with full jitter over its upper half so that workers
    retrying the same cause do not wake together.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    # Exception types dead-lettered on their first failure, in addition to
    # `PermanentError` and payload validation errors.
    give_up_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise errors.HandlerRegistrationError(f"max_attempts={self.max_attempts} is invalid; it must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise errors.HandlerRegistrationError("retry backoff must not be negative")

    def backoff_s(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Return the delay after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** max(attempt - 1, 0))
        jitter: float = (rng or random).uniform(0, ceiling / 2)
        return ceiling / 2 + jitter


def classify(exc: BaseException, policy: RetryPolicy) -> ErrorClass:
    """Decide whether `exc` is the infrastructure's fault, permanent, or worth retrying."""
    if is_infrastructure(exc):
        return ErrorClass.INFRASTRUCTURE
    if isinstance(exc, errors.PermanentError | pydantic.ValidationError):
        return ErrorClass.PERMANENT
    if policy.give_up_on and isinstance(exc, policy.give_up_on):
        return ErrorClass.PERMANENT
    return ErrorClass.RETRIABLE


def is_side_task_recoverable(exc: BaseException) -> bool:
    """Return True for errors a periodic side task (pruning, gauges, position checks) waits out.

    Any PostgreSQL error counts, besides infrastructure errors: a database
    that refuses connections for a while must not stop the worker through a
    task that merely counts rows.
    """
    return is_infrastructure(exc) or isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError)


def is_infrastructure(exc: BaseException) -> bool:
    """Return True for connection losses and transient PostgreSQL errors."""
    if isinstance(exc, errors.InfrastructureError):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.InternalClientError):
        # asyncpg 0.32 raises it ("cannot switch to state ...; another
        # operation is in progress") on the first statement after the server
        # killed the backend, when it has read the FATAL message but not yet
        # the closed socket.
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # asyncpg detaches a pool connection whose socket was lost; every
        # later call on it says so in one of these words.
        text = str(exc)
        return "closed" in text or "released back to the pool" in text
    if isinstance(exc, asyncpg.PostgresError):
        return getattr(exc, "sqlstate", None) in _TRANSIENT_SQLSTATES
    return False
