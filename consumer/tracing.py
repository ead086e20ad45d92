"""Optional OpenTelemetry tracing of polls, batch transactions and handler calls.

Every function here does nothing unless ``opentelemetry-api`` can be imported
(``pip install 'consumer[tracing]'``) and the application has set a global
tracer provider, usually the SDK's with an exporter (docs/operations.md shows
the set-up). Spans come from the tracer named ``consumer``.

Names and attributes follow the OpenTelemetry messaging semantic conventions
1.44.0, which still have development status:

- ``poll {topic}`` (kind CLIENT, operation type ``receive``): one per fetch
  that returned records, from the start of the fetch to its end. A fetch that
  returned records of several topics is named ``poll``.
- ``process {topic}`` (kind CONSUMER, operation type ``process``): one per
  batch transaction of one partition, with the batch size and what the
  transaction did.
- ``handle {topic}`` (kind CONSUMER, operation type ``process``): one per
  handler call, a child of its batch's span. It links to the trace context
  that the global propagator finds in each message's headers (``traceparent``
  and ``tracestate`` with the default W3C propagator).

Poll and batch spans start a new trace: they belong to the worker's loops,
not to whatever span the caller of `Worker.run` had open.

A handler span links to the producer's context instead of taking it as its
parent, as the conventions recommend. A span has one parent, which here is
the batch span, and a batch handler call covers many messages, each with a
context of its own. Publishing through the outbox writes the current context
into the outbox row's headers, so a consumer downstream links to the handler
span that published.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from consumer.message import Header, Message, RawMessage

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import Getter
except ImportError:
    # The tracing extra is not installed, so every function below is a no-op.
    AVAILABLE = False
else:
    AVAILABLE = True

if TYPE_CHECKING:
    from consumer.inbox import BatchOutcome, BatchSpec

__all__ = ["AVAILABLE", "BatchTrace", "add_trace_context", "batch_span", "handler_span", "record_poll"]

TRACER_NAME = "consumer"
# The semantic conventions version the names and attributes follow.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"

_SYSTEM = "kafka"


@functools.cache
def _tracer() -> trace.Tracer:
    # Before the application sets a provider this is a proxy that starts
    # recording once one is set.
    try:
        version: str | None = importlib.metadata.version("consumer")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return trace.get_tracer(TRACER_NAME, version, schema_url=SCHEMA_URL)


def _tracing() -> bool:
    """Return whether spans can be recorded: the API is installed and an application set a tracer provider.

    Without a provider every span would be a no-op, but building its
    attributes and links would still cost CPU on every handler call, so
    nothing is built. Measured with `timeit` and API 1.45 on a 2-core Xeon
    VM, a handler call cost 13 microseconds of tracing without this check
    and 1 with it.
    """
    if not AVAILABLE:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def record_poll(fetched: Mapping[Any, Sequence[Any]], group_id: str, started_ns: int) -> None:
    """Record a ``poll`` span from `started_ns` (from `time.time_ns`) to now when the fetch returned records.

    `fetched` maps aiokafka's TopicPartition to the records of that partition.
    The span is created after the fetch because only then is it known
    whether records came back.
    """
    if not fetched or not _tracing():
        return
    topics = {tp.topic for tp in fetched}
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.name": "poll",
        "messaging.operation.type": "receive",
        "messaging.consumer.group.name": group_id,
        "messaging.batch.message_count": sum(len(records) for records in fetched.values()),
    }
    name = "poll"
    if len(topics) == 1:
        (topic,) = topics
        name = f"poll {topic}"
        attributes["messaging.destination.name"] = topic
    if len(fetched) == 1:
        (tp,) = fetched
        attributes["messaging.destination.partition.id"] = str(tp.partition)
    span = _tracer().start_span(
        name,
        context=otel_context.Context(),
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
        start_time=started_ns,
    )
    span.end()


class BatchTrace:
    """The span of one batch transaction, to which `record` adds what the committed transaction did."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span | None) -> None:
        self.span = span

    def record(self, outcome: BatchOutcome) -> None:
        """Set the outcome counts of a committed (or repositioned) batch on the span."""
        if self.span is None or not self.span.is_recording():
            return
        self.span.set_attributes(
            {
                "consumer.batch.result": "repositioned" if outcome.repositioned else "committed",
                "consumer.batch.next_offset": outcome.next_offset,
                "consumer.batch.applied": outcome.applied,
                "consumer.batch.position_duplicates": outcome.position_duplicates,
                "consumer.batch.key_duplicates": outcome.key_duplicates,
                "consumer.batch.dead_lettered": outcome.dead_lettered,
                "consumer.batch.parked": outcome.parked,
                "consumer.batch.conflicts": outcome.conflicts,
                "consumer.batch.tombstones_skipped": outcome.tombstones_skipped,
                "consumer.batch.handler_calls": outcome.handler_calls,
            }
        )
        if outcome.stopped_at is not None:
            # The transaction committed the messages before this offset only.
            self.span.set_attribute("consumer.batch.stopped_at", outcome.stopped_at)


# Shared because a null context can be entered any number of times, so a
# disabled span costs one function call and no generator.
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
_NO_BATCH_TRACE: AbstractContextManager[BatchTrace] = contextlib.nullcontext(BatchTrace(None))


def batch_span(spec: BatchSpec, batch: Sequence[RawMessage], *, savepoints: bool) -> AbstractContextManager[BatchTrace]:
    """Return a context that runs its block in a ``process`` span for one batch transaction of one partition.

    An exception leaving the block marks the span as failed. When it is the
    signal that a handler failed in the fast path, the span names the
    handler's error, which the handler span records in full.
    """
    if not _tracing():
        return _NO_BATCH_TRACE
    return _batch_span(spec, batch, savepoints=savepoints)


@contextlib.contextmanager
def _batch_span(spec: BatchSpec, batch: Sequence[RawMessage], *, savepoints: bool) -> Iterator[BatchTrace]:
    first = batch[0]
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": first.topic,
        "messaging.destination.partition.id": str(first.partition),
        "messaging.consumer.group.name": spec.group_id,
        "messaging.batch.message_count": len(batch),
        "consumer.batch.savepoints": savepoints,
    }
    with _tracer().start_as_current_span(
        f"process {first.topic}",
        context=otel_context.Context(),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield BatchTrace(span)
        except Exception as exc:
            _fail_batch(span, exc)
            raise
        except BaseException:
            # A shutdown past its timeout cancels the transaction, which rolls back.
            span.set_attribute("consumer.batch.result", "cancelled")
            raise


def _fail_batch(span: trace.Span, exc: Exception) -> None:
    # Imported here because consumer.inbox imports this module.
    from consumer.inbox import RetryWithSavepoints

    if isinstance(exc, RetryWithSavepoints):
        span.set_attribute("consumer.batch.result", "rolled_back")
        span.set_attribute("consumer.batch.failed_offset", exc.offset)
        span.set_attribute("error.type", _error_type(exc.error))
        span.set_status(
            trace.StatusCode.ERROR,
            f"{type(exc.error).__name__} at offset {exc.offset}; "
            "the batch rolled back and is redone with a savepoint per message",
        )
        return
    span.set_attribute("consumer.batch.result", "failed")
    _record_error(span, exc)


def handler_span(spec: BatchSpec, messages: Sequence[Message[Any]], *, attempt: int) -> AbstractContextManager[None]:
    """Return a context that runs its block in a ``handle`` span for one handler call.

    The span links to the trace context found in each message's headers.

    `messages` is the one message of a `Handler.handle` call, or every
    message of a `BatchHandler.handle_batch` call, all from one partition.
    An exception leaving the block is recorded on the span.

    No span is created unless the current span (the batch's) is recorded.
    Under the SDK's default parent-based sampler a handler span of an
    unsampled batch would not be recorded either, but would still cost its
    links and attributes.
    """
    if not _tracing() or not trace.get_current_span().is_recording():
        return _NO_SPAN
    return _handler_span(spec, messages, attempt=attempt)


@contextlib.contextmanager
def _handler_span(spec: BatchSpec, messages: Sequence[Message[Any]], *, attempt: int) -> Iterator[None]:
    first = messages[0]
    attributes: dict[str, Any] = {
        "messaging.system": _SYSTEM,
        "messaging.operation.name": "handle",
        "messaging.operation.type": "process",
        "messaging.destination.name": first.topic,
        "messaging.destination.partition.id": str(first.partition),
        "messaging.consumer.group.name": spec.group_id,
        "consumer.handler.name": spec.handler.name(),
        "consumer.handler.attempt": attempt,
    }
    if len(messages) == 1:
        attributes["messaging.kafka.offset"] = first.offset
        if first.value is None:
            attributes["messaging.kafka.message.tombstone"] = True
    else:
        attributes["messaging.batch.message_count"] = len(messages)
    # NOTE: the SDK keeps 128 links per span unless OTEL_SPAN_LINK_COUNT_LIMIT
    # raises it, so a batch handler call over more messages loses the rest.
    links = [link for link in map(_link_to_producer, messages) if link is not None]
    with _tracer().start_as_current_span(
        f"handle {first.topic}",
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except Exception as exc:
            _record_error(span, exc)
            raise


def add_trace_context(headers: list[Header]) -> None:
    """Append the current trace context to outgoing `headers`, keeping any such header already present.

    The global propagator decides the header names: ``traceparent`` and
    ``tracestate`` (and ``baggage`` when set) by default.
    """
    if not _tracing():
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return
    present = {name.lower() for name, _ in headers}
    for name, value in carrier.items():
        # A context the caller set on purpose is not replaced.
        if name.lower() not in present:
            headers.append((name, value.encode("utf-8")))


def _link_to_producer(message: Message[Any]) -> trace.Link | None:
    extracted = propagate.extract(message.headers, context=otel_context.Context(), getter=_HEADER_GETTER)
    span_context = trace.get_current_span(extracted).get_span_context()
    return trace.Link(span_context) if span_context.is_valid else None


def _record_error(span: trace.Span, exc: BaseException) -> None:
    span.set_attribute("error.type", _error_type(exc))
    span.record_exception(exc)
    span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")


def _error_type(exc: BaseException) -> str:
    """Return the exception's class name, qualified by its module unless it is a built-in."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


if AVAILABLE:

    class _HeaderGetter(Getter[Sequence[Header]]):
        """Reads propagation fields from Kafka headers, comparing names without case and decoding values as UTF-8."""

        def get(self, carrier: Sequence[Header], key: str) -> list[str] | None:
            wanted = key.lower()
            values = [
                value.decode("utf-8", "replace")
                for name, value in carrier
                if value is not None and name.lower() == wanted
            ]
            return values or None

        def keys(self, carrier: Sequence[Header]) -> list[str]:
            return [name for name, _ in carrier]

    _HEADER_GETTER = _HeaderGetter()
