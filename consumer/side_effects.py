"""Retry-safe effects outside the inbox transaction: stored steps, derived keys, the outbox.

Which effect gets which guarantee (docs/side-effects.md has the long form):

- a write through ``context.connection``: exactly once, in the batch
  transaction;
- ``context.step(name, call)``: the call runs again only if the process dies
  between the call returning and its result being committed (its own short
  transaction); every later run of the handler for that message gets the
  stored result;
- an outbound call carrying ``context.idempotency_key(name)``: exactly once
  where the remote side deduplicates on that key, because the key is the
  same on every retry, redelivery and replay;
- ``context.publish(...)``: the outbox row commits with the effects; the
  relay sends it at least once, with an ``Idempotency-Key`` header that a
  consumer built on this framework deduplicates on.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pydantic

from consumer import errors, tracing
from consumer.message import Header, Message

__all__ = ["SideEffects", "derive_key", "encode_value"]

logger = logging.getLogger(__name__)

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
_MAX_NAME_LENGTH = 200


def derive_key(dedup_scope: str, message_key: str, name: str) -> str:
    """Return a key that is the same for this message and name on every run: a SHA-256 hex digest."""
    material = "\x1f".join((dedup_scope, message_key, name))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def encode_value(value: Any) -> bytes | None:
    """Encode a published value: bytes as they are, text as UTF-8, models and JSON data as JSON."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json().encode("utf-8")
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except TypeError as exc:
        raise errors.PermanentError(
            f"cannot publish a {type(value).__name__}: {exc}; pass bytes, str, a pydantic model or JSON data"
        ) from exc


def _check_name(name: str) -> None:
    if not name or len(name) > _MAX_NAME_LENGTH:
        raise errors.PermanentError(f"step name {name!r} is invalid; use 1 to {_MAX_NAME_LENGTH} characters")


@dataclass(slots=True)
class SideEffects:
    """Per handler call: numbering of steps and publishes, and the connections they use.

    `acquire_side_connection` lends a connection outside the batch
    transaction, so a step result commits even when the batch rolls back.
    """

    queries: Any
    dedup_scope: str
    acquire_side_connection: Callable[[], Any]
    on_publish: Callable[[], None] | None = None
    _step_calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    _publishes: Counter[str] = field(default_factory=Counter)

    def idempotency_key(self, message: Message[Any], name: str) -> str:
        _check_name(name)
        return derive_key(self.dedup_scope, message.idempotency_key, name)

    async def step(
        self,
        connection: asyncpg.Connection,
        message: Message[Any],
        name: str,
        call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Return the stored result of this step, or run `call` and store its result first."""
        _check_name(name)
        self._step_calls[(message.idempotency_key, name)] += 1
        number = self._step_calls[(message.idempotency_key, name)]
        key = (self.dedup_scope, message.idempotency_key, name, number)
        stored = await connection.fetchval(self.queries.read_step, *key)
        if stored is not None:
            logger.debug("step result reused", extra={"action": "step_reused", "step": name, "offset": message.offset})
            return json.loads(stored)

        result = call(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        try:
            encoded = json.dumps(result)
        except TypeError as exc:
            raise errors.PermanentError(
                f"step {name!r} returned a {type(result).__name__}, which is not JSON data: {exc}; "
                "return dicts, lists, strings or numbers"
            ) from exc
        async with self.acquire_side_connection() as side:
            await side.execute(self.queries.store_step, *key, encoded)
            stored = await side.fetchval(self.queries.read_step, *key)
        return json.loads(stored)

    async def publish(
        self,
        connection: asyncpg.Connection,
        message: Message[Any],
        topic: str,
        value: Any,
        key: bytes | str | None,
        headers: list[Header] | None,
    ) -> str:
        """Write an outbox row in the batch transaction; return the Idempotency-Key it carries."""
        if not topic:
            raise errors.PermanentError("publish needs a topic name")
        self._publishes[message.idempotency_key] += 1
        number = self._publishes[message.idempotency_key]
        outbound_key = derive_key(self.dedup_scope, message.idempotency_key, f"publish:{number}")
        all_headers = [header for header in headers or [] if header[0].lower() != IDEMPOTENCY_KEY_HEADER.lower()]
        all_headers.append((IDEMPOTENCY_KEY_HEADER, outbound_key.encode("ascii")))
        tracing.add_trace_context(all_headers)
        await connection.execute(
            self.queries.insert_outbox,
            self.dedup_scope,
            topic,
            key.encode("utf-8") if isinstance(key, str) else key,
            encode_value(value),
            [name for name, _ in all_headers],
            [header_value for _, header_value in all_headers],
        )
        if self.on_publish is not None:
            self.on_publish()
        return outbound_key


StepCall = Callable[..., Awaitable[Any] | Any]
