"""Trace context read from message headers and written to published headers, without servers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing tests need opentelemetry-sdk")

from opentelemetry import trace

from consumer import tracing
from consumer.message import Header, Message, RawMessage

pytestmark = pytest.mark.unit

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01".encode()
SPEC = SimpleNamespace(group_id="orders-store", handler=SimpleNamespace(name=lambda: "shop.handlers:OrderHandler"))


def _batch() -> Any:
    """Return a recorded span standing in for the batch span that handler spans need as parent."""
    return trace.get_tracer("tests").start_as_current_span("batch")


def _message(offset: int, headers: tuple[Header, ...]) -> Message[Any]:
    raw = RawMessage(topic="orders", partition=2, offset=offset, key=None, value=b"{}", headers=headers)
    return Message(raw=raw, payload={})


def test_link_header_name_ignores_case(spans: Any) -> None:
    message = _message(7, (("TraceParent", TRACEPARENT),))

    with _batch(), tracing.handler_span(SPEC, [message], attempt=2):
        pass
    span, _ = spans.get_finished_spans()

    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [(TRACE_ID, SPAN_ID)]
    assert span.attributes["messaging.kafka.offset"] == 7
    assert span.attributes["messaging.destination.partition.id"] == "2"
    assert span.attributes["consumer.handler.attempt"] == 2


def test_invalid_traceparent_gets_no_link(spans: Any) -> None:
    message = _message(7, (("traceparent", b"00-not-a-trace-01"), ("traceparent", None)))

    with _batch(), tracing.handler_span(SPEC, [message], attempt=1):
        pass
    span, _ = spans.get_finished_spans()

    assert span.links == ()


def test_tombstone_attribute_only_for_null_value(spans: Any) -> None:
    raw = RawMessage(topic="orders", partition=0, offset=3, key=b"k", value=None)

    with _batch(), tracing.handler_span(SPEC, [Message(raw=raw, payload=None)], attempt=1):
        pass
    with _batch(), tracing.handler_span(SPEC, [_message(4, ())], attempt=1):
        pass
    tombstone, _, regular, _ = spans.get_finished_spans()

    assert tombstone.attributes["messaging.kafka.message.tombstone"] is True
    assert "messaging.kafka.message.tombstone" not in regular.attributes


def test_no_handler_span_outside_recorded_span(spans: Any) -> None:
    with tracing.handler_span(SPEC, [_message(7, (("traceparent", TRACEPARENT),))], attempt=1):
        pass

    assert spans.get_finished_spans() == ()


def test_context_added_inside_span(spans: Any) -> None:
    headers: list[Header] = [("Idempotency-Key", b"k-1")]

    with trace.get_tracer("tests").start_as_current_span("handler") as span:
        tracing.add_trace_context(headers)
    context = span.get_span_context()

    assert headers[0] == ("Idempotency-Key", b"k-1")
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert headers[1] == ("traceparent", traceparent.encode())
    assert len(headers) == 2


def test_context_kept_when_caller_set_it(spans: Any) -> None:
    headers: list[Header] = [("TRACEPARENT", TRACEPARENT)]

    with trace.get_tracer("tests").start_as_current_span("handler"):
        tracing.add_trace_context(headers)

    assert headers == [("TRACEPARENT", TRACEPARENT)]


def test_no_context_outside_span(spans: Any) -> None:
    headers: list[Header] = []

    tracing.add_trace_context(headers)

    assert headers == []
