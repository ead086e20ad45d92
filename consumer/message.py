"""Messages as handlers see them: raw Kafka fields plus the decoded payload."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Header", "Message", "RawMessage", "position_key"]

PayloadT = TypeVar("PayloadT")

Header = tuple[str, bytes | None]


def position_key(topic: str, partition: int, offset: int) -> str:
    """Return the idempotency key used when a message has no key of its own."""
    return f"{topic}/{partition}/{offset}"


# Messages are plain slotted dataclasses rather than frozen ones: a frozen
# dataclass sets each field through object.__setattr__, which costs about
# 0.6 us per object, and two objects are built for every fetched record.
# Treat both as read-only: the framework never changes them after building.
@dataclass(slots=True)
class RawMessage:
    """A Kafka record exactly as fetched: bytes are never altered."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...] = ()
    timestamp_ms: int | None = None

    def header(self, name: str) -> bytes | None:
        """Return the first header value whose name matches `name`, ignoring case."""
        wanted = name.lower()
        for header_name, header_value in self.headers:
            # The exact spelling is by far the most common: compare it before lowering.
            if header_name == name or header_name.lower() == wanted:
                return header_value
        return None

    def fingerprint(self) -> bytes:
        """Return the SHA-256 of the value, used to tell a duplicate from a reused key."""
        return hashlib.sha256(self.value if self.value is not None else b"").digest()

    @property
    def position(self) -> str:
        """Topic, partition and offset in one string, for logs and default keys."""
        return position_key(self.topic, self.partition, self.offset)


@dataclass(slots=True)
class Message(Generic[PayloadT]):
    """A decoded message handed to a handler.

    `idempotency_key` is the key the message was deduplicated on: the one the
    handler derived, the ``Idempotency-Key`` header, or the Kafka position
    when neither exists.
    """

    raw: RawMessage
    payload: PayloadT
    # None until a key is derived. Without one, the position is used as the key.
    own_key: str | None = None

    @property
    def idempotency_key(self) -> str:
        return self.own_key if self.own_key is not None else self.raw.position

    @property
    def keyed(self) -> bool:
        """True when the message has a key of its own, so it is deduplicated by key, not only by position."""
        return self.own_key is not None

    @property
    def topic(self) -> str:
        return self.raw.topic

    @property
    def partition(self) -> int:
        return self.raw.partition

    @property
    def offset(self) -> int:
        return self.raw.offset

    @property
    def key(self) -> bytes | None:
        return self.raw.key

    @property
    def value(self) -> bytes | None:
        return self.raw.value

    @property
    def headers(self) -> tuple[Header, ...]:
        return self.raw.headers

    @property
    def timestamp_ms(self) -> int | None:
        return self.raw.timestamp_ms

    def header(self, name: str) -> bytes | None:
        """Return the first header value whose name matches `name`, ignoring case."""
        return self.raw.header(name)


def decoded_as(raw: RawMessage, payload: Any, key: str | None) -> Message[Any]:
    """Build a `Message`, falling back to the position when `key` is None."""
    return Message(raw, payload, key)
