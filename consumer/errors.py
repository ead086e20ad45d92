"""The exception hierarchy: every error the framework raises is a `ConsumerError`.

Each class says whether retrying can help (`retriable`). Its docstring is the
default message, and a message built at the raise site names the value and
the fix.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConsumerError",
    "DecodeError",
    "HandlerRegistrationError",
    "InfrastructureError",
    "MigrationError",
    "PermanentError",
    "ShutdownTimeout",
]


class ConsumerError(Exception):
    """The consumer framework failed."""

    retriable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(ConsumerError):
    """A setting is missing or invalid; fix the named variable and start again."""


class HandlerRegistrationError(ConsumerError):
    """A handler class is not usable; fix its declaration and start again."""


class MigrationError(ConsumerError):
    """The database schema cannot be brought up to date."""


class PermanentError(ConsumerError):
    """The message can never succeed; it is dead-lettered without retries.

    Raise it from a handler for input that is valid Kafka data but wrong for
    the business, so no attempt is wasted on it.
    """


class DecodeError(PermanentError):
    """The message payload could not be decoded or validated; it is dead-lettered at once."""

    def __init__(self, message: str | None = None, *, reason: str = "decode") -> None:
        super().__init__(message)
        self.reason = reason


class InfrastructureError(ConsumerError):
    """PostgreSQL or Kafka failed for a reason unrelated to the message; the whole batch is retried."""

    retriable = True


class ShutdownTimeout(ConsumerError):
    """In-flight messages did not finish within the shutdown timeout; they were rolled back and will be redelivered."""
