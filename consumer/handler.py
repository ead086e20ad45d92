"""The `Handler` base class users subclass, and the `Context` it is handed.

A handler declares what it consumes and writes its effects through
``context.connection``, which is inside the transaction that also records the
message as processed and advances the partition's position::

    class QuakeHandler(Handler[dict]):
        topics = ["quakes"]
        group_id = "quake-store"

        def idempotency_key(self, message):
            return message.payload["event_id"]

        async def handle(self, message, context):
            await context.connection.execute("insert ... on conflict ...", ...)

A `BatchHandler` receives every new message of a batch in one call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import asyncpg
import pydantic

from consumer import errors
from consumer.deferred import DeferredWrites
from consumer.message import Message, RawMessage, decoded_as
from consumer.retry import RetryPolicy
from consumer.side_effects import SideEffects

__all__ = ["BatchHandler", "Context", "Handler", "load_handler"]

PayloadT = TypeVar("PayloadT")

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 512


@dataclass(slots=True)
class Context:
    """Per-call state handed to a handler besides its message.

    `connection` is inside the batch transaction: every statement run through
    it commits or rolls back together with the dedup record and the position.
    Do not commit, roll back or start another transaction on it.
    """

    connection: asyncpg.Connection
    group_id: str
    dedup_scope: str
    attempt: int
    logger: logging.Logger
    # The message of a per-message call; None in a batch call, where the
    # methods below take the message as an argument.
    message: Message[Any] | None = None
    # Builds the step and outbox helper on first use, so a handler that uses
    # neither pays nothing for it.
    side_effects_factory: Callable[[], SideEffects] | None = None
    side_effects: SideEffects | None = None
    # Where `defer` queues statements; None outside the batch transaction.
    deferred: DeferredWrites | None = None

    def defer(self, query: str, *args: Any) -> None:
        """Queue `query` with `args` to run in this transaction once the handler calls of the batch are done.

        Deferred statements run in the order they were queued. Each run of
        consecutive statements with the same text is sent as one
        ``executemany``, so a handler that defers one INSERT per message costs
        one round trip per batch instead of one per message. They commit or roll back with the batch
        like any statement on ``connection``. A read in the same batch does
        not see them yet: use ``connection.execute`` for a write that a later
        message of the batch must read.
        """
        if self.deferred is None:
            raise errors.ConsumerError("defer needs the batch transaction; this context has none")
        self.deferred.add(query, args)

    def idempotency_key(self, name: str, message: Message[Any] | None = None) -> str:
        """Return a key for an outbound call, the same on every retry, redelivery and replay of the message.

        Send it as the remote API's idempotency key (for example the
        ``Idempotency-Key`` header) so the remote effect happens once.
        """
        return self._side().idempotency_key(self._message(message), name)

    async def step(
        self, name: str, call: Callable[..., Any], *args: Any, message: Message[Any] | None = None, **kwargs: Any
    ) -> Any:
        """Run `call` once per message and step name, and return its result, stored as JSON.

        The result is committed on its own as soon as the call returns, so a
        retry, a rollback or a redelivery gets the stored result instead of
        calling again. Calling the same name twice in one run numbers the
        calls, so they do not collide.
        """
        target = self._message(message)
        return await self._side().step(self.connection, target, name, call, args, kwargs)

    async def publish(
        self,
        topic: str,
        value: Any,
        *,
        key: bytes | str | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
        message: Message[Any] | None = None,
    ) -> str:
        """Publish `value` to `topic` through the outbox, in this transaction; return its Idempotency-Key."""
        return await self._side().publish(self.connection, self._message(message), topic, value, key, headers)

    def _message(self, message: Message[Any] | None) -> Message[Any]:
        chosen = message or self.message
        if chosen is None:
            raise errors.ConsumerError("in a batch handler, pass message= to idempotency_key, step and publish")
        return chosen

    def _side(self) -> SideEffects:
        if self.side_effects is None and self.side_effects_factory is not None:
            self.side_effects = self.side_effects_factory()
        if self.side_effects is None:
            raise errors.ConsumerError("steps and publishing need a worker; this context has none")
        return self.side_effects


class Handler(Generic[PayloadT]):
    """Base class of a message handler: subclass it and override `handle`.

    Class attributes:

    - `topics`: the topics to consume (required, non-empty).
    - `group_id`: the Kafka consumer group (required).
    - `dedup_scope`: where dedup records and positions are kept; defaults to
      the group id. Give two deployments the same scope to dedup each other.
    - `payload_model`: a pydantic model the JSON value is validated into.
      Without one, `payload_format` chooses JSON (``dict``/``list``), text or
      raw bytes.
    - `retry`: the `RetryPolicy`; None takes the worker settings.
    - `migrations`: a folder of numbered ``.sql`` files for the handler's
      own tables, applied by ``consumer migrate --handler``.
    - `failure_mode`: ``block`` (default) keeps the partition at a failing
      message until it succeeds or is dead-lettered; ``park`` dead-letters it
      as parked and parks every later message with the same Kafka key behind
      it, in order, while other keys go on.
    - `on_key_conflict`: what a key arriving again with a different payload
      does: ``dead_letter`` (default) with reason ``conflict``, ``log`` a
      warning and skip it, or treat it as a plain ``duplicate``.
    - `ordering`: ``partition`` (default) calls the handler for one message
      of a partition at a time; ``key`` runs messages with different Kafka
      keys concurrently, keeping each key's order; ``none`` runs them all
      concurrently. Up to `max_concurrency` calls per partition run at once,
      sharing the batch transaction (see `consumer.concurrency`).
    - `dead_letter_topic`: also publish each dead letter there, through the
      outbox, with its original key, value and headers.
    - `tombstones`: what a null value does: ``handle`` (payload None),
      ``skip``, or ``dead_letter``. Unset, it is ``handle`` without a
      `payload_model` and ``dead_letter`` with one.
    """

    topics: ClassVar[Sequence[str]] = ()
    group_id: ClassVar[str] = ""
    dedup_scope: ClassVar[str | None] = None
    payload_model: ClassVar[type[pydantic.BaseModel] | None] = None
    payload_format: ClassVar[Literal["json", "text", "bytes"]] = "json"
    retry: ClassVar[RetryPolicy | None] = None
    migrations: ClassVar[Path | None] = None
    failure_mode: ClassVar[Literal["block", "park"]] = "block"
    on_key_conflict: ClassVar[Literal["dead_letter", "log", "duplicate"]] = "dead_letter"
    tombstones: ClassVar[Literal["handle", "skip", "dead_letter"] | None] = None
    dead_letter_topic: ClassVar[str | None] = None
    ordering: ClassVar[Literal["partition", "key", "none"]] = "partition"
    max_concurrency: ClassVar[int] = 16

    @classmethod
    def tombstone_policy(cls) -> Literal["handle", "skip", "dead_letter"]:
        """Return what happens to a null value: by default handled, or dead-lettered when a model is declared."""
        if cls.tombstones is not None:
            return cls.tombstones
        return "dead_letter" if cls.payload_model is not None else "handle"

    def decode(self, raw: RawMessage) -> Any:
        """Turn the raw value into the payload; raise `errors.DecodeError` when it cannot be done.

        A null value (a tombstone) decodes to None without validation.
        """
        if raw.value is None:
            return None
        if self.payload_model is not None:
            return _validate(self.payload_model, raw.value)
        if self.payload_format == "bytes":
            return raw.value
        try:
            text = raw.value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise errors.DecodeError(f"value is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if self.payload_format == "text":
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise errors.DecodeError(f"value is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc

    def idempotency_key(self, message: Message[PayloadT]) -> str | None:
        """Return the key this message is deduplicated on, or None to dedup by position only.

        The default is the ``Idempotency-Key`` header when present. Override it
        to derive the key from the payload, such as an event id.
        """
        header = message.header(IDEMPOTENCY_KEY_HEADER)
        if header is None:
            return None
        try:
            return header.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise errors.DecodeError(f"{IDEMPOTENCY_KEY_HEADER} header is not UTF-8") from exc

    def fingerprint(self, message: Message[PayloadT]) -> bytes:
        """Return what tells a true copy of a keyed message from a reused key: by default SHA-256 of the value.

        Override it when the value carries delivery metadata that differs
        between copies (a delivery id, a poll time), hashing only the part
        that must be equal for two messages to be the same.
        """
        return message.raw.fingerprint()

    async def handle(self, message: Message[PayloadT], context: Context) -> None:
        """Apply one message's effects through ``context.connection``."""
        raise NotImplementedError(f"{type(self).__name__}.handle is not implemented; override it")

    @classmethod
    def name(cls) -> str:
        """Return the import path of the class, as stored in dead letters."""
        return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def validate_declaration(cls) -> None:
        """Reject an unusable class at start-up rather than at the first message."""
        if isinstance(cls.topics, str):
            raise errors.HandlerRegistrationError(
                f"{cls.name()}.topics is the string {cls.topics!r}; write it as a list: [{cls.topics!r}]"
            )
        if not cls.topics or not all(isinstance(topic, str) and topic for topic in cls.topics):
            raise errors.HandlerRegistrationError(
                f"{cls.name()}.topics is empty; list the topics to consume, e.g. topics = ['orders']"
            )
        if len(set(cls.topics)) != len(cls.topics):
            raise errors.HandlerRegistrationError(f"{cls.name()}.topics lists a topic twice: {list(cls.topics)}")
        if not cls.group_id:
            raise errors.HandlerRegistrationError(
                f"{cls.name()}.group_id is empty; set the consumer group, e.g. group_id = 'orders-ledger'"
            )
        choices = {
            "failure_mode": (cls.failure_mode, ("block", "park")),
            "on_key_conflict": (cls.on_key_conflict, ("dead_letter", "log", "duplicate")),
            "tombstones": (cls.tombstones, (None, "handle", "skip", "dead_letter")),
            "ordering": (cls.ordering, ("partition", "key", "none")),
        }
        for attribute, (value, allowed) in choices.items():
            if value not in allowed:
                raise errors.HandlerRegistrationError(
                    f"{cls.name()}.{attribute}={value!r} is invalid; use one of {', '.join(map(repr, allowed))}"
                )
        if not isinstance(cls.max_concurrency, int) or cls.max_concurrency < 1:
            raise errors.HandlerRegistrationError(
                f"{cls.name()}.max_concurrency={cls.max_concurrency!r} is invalid; use a whole number of at least 1"
            )
        if cls.payload_format not in ("json", "text", "bytes"):
            raise errors.HandlerRegistrationError(
                f"{cls.name()}.payload_format={cls.payload_format!r} is invalid; use 'json', 'text' or 'bytes'"
            )


class BatchHandler(Handler[PayloadT]):
    """A handler that receives every new message of a batch in one call.

    If the call raises, the batch is rolled back and its messages are applied
    one at a time through `handle_batch` with a single message, so that a
    failing message is retried and dead-lettered on its own.
    """

    async def handle_batch(self, messages: Sequence[Message[PayloadT]], context: Context) -> None:
        """Apply the effects of `messages` (in offset order, duplicates removed)."""
        raise NotImplementedError(f"{type(self).__name__}.handle_batch is not implemented; override it")

    async def handle(self, message: Message[PayloadT], context: Context) -> None:
        await self.handle_batch([message], context)


def build_message(handler: Handler[Any], raw: RawMessage) -> Message[Any]:
    """Decode `raw` and derive its idempotency key; raise `errors.DecodeError` on bad input."""
    message = decoded_as(raw, handler.decode(raw), None)
    key = handler.idempotency_key(message)
    if key is None:
        return message
    if not isinstance(key, str) or not key:
        raise errors.DecodeError(
            f"{type(handler).__name__}.idempotency_key returned {key!r}; it must return a non-empty str or None",
            reason="validation",
        )
    if len(key) > MAX_KEY_LENGTH:
        raise errors.DecodeError(
            f"idempotency key is {len(key)} characters long; the maximum is {MAX_KEY_LENGTH}",
            reason="validation",
        )
    # The key is set on the message the handler's idempotency_key saw, so
    # each record builds one Message.
    message.own_key = key
    return message


def load_handler(path: str) -> type[Handler[Any]]:
    """Import ``module:ClassName`` and check that it is a usable `Handler` subclass."""
    import importlib

    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise errors.HandlerRegistrationError(
            f"handler {path!r} is not in the form module:ClassName, e.g. my_app.handlers:OrderHandler"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise errors.HandlerRegistrationError(
            f"cannot import module {module_name!r} of handler {path!r}: {exc}; check PYTHONPATH and the spelling"
        ) from exc
    handler_class = getattr(module, class_name, None)
    if not isinstance(handler_class, type) or not issubclass(handler_class, Handler):
        raise errors.HandlerRegistrationError(
            f"{path!r} is not a subclass of consumer.Handler; point at the handler class"
        )
    handler_class.validate_declaration()
    return handler_class


def _validate(model: type[pydantic.BaseModel], value: bytes) -> pydantic.BaseModel:
    try:
        return model.model_validate_json(value)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        if first["type"] == "json_invalid":
            raise errors.DecodeError(f"value is not valid JSON: {first['msg']}", reason="decode") from exc
        location = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise errors.DecodeError(
            f"value does not match {model.__name__}: {location}: {first['msg']} ({exc.error_count()} error(s))",
            reason="validation",
        ) from exc
