"""Spans of an in-process worker against the real broker and PostgreSQL, recorded by the SDK's in-memory exporter."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing tests need opentelemetry-sdk")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tests.integration import helpers
from tests.integration.helpers import Rows
from tests.support import kafka
from tests.tracing.handlers import RecordingBatchHandler, ScriptedHandler

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def _traceparent() -> tuple[int, int, bytes]:
    """Return a random trace id, span id and the ``traceparent`` header value that carries them, sampled."""
    trace_id = random.getrandbits(128) | 1
    span_id = random.getrandbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01".encode()


def _record(payload: dict[str, Any], headers: Sequence[tuple[str, bytes]] = ()) -> kafka.Record:
    return kafka.Record(key=str(payload["id"]).encode(), value=json.dumps(payload).encode(), headers=list(headers))


def _named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def _attribute(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(name)


def _handler_spans_by_offset(spans: Sequence[ReadableSpan], topic: str) -> dict[int, list[ReadableSpan]]:
    by_offset: dict[int, list[ReadableSpan]] = {}
    for span in _named(spans, f"handle {topic}"):
        by_offset.setdefault(_attribute(span, "messaging.kafka.offset"), []).append(span)
    return by_offset


def _parse_traceparent(value: bytes) -> tuple[int, int]:
    version, trace_id, span_id, _flags = value.decode().split("-")
    assert version == "00"
    return int(trace_id, 16), int(span_id, 16)


async def test_poll_batch_and_handler_spans(
    kafka_bootstrap: str, topic_factory: Callable[..., str], migrated_database: str, rows: Rows, spans: Any
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group("trace")
    trace_id, span_id, traceparent = _traceparent()
    records = [
        _record({"id": 0}, [("traceparent", traceparent), ("tracestate", b"vendor=opaque")]),
        _record({"id": 1}),
    ]
    await kafka.produce(kafka_bootstrap, topic, records)
    config = helpers.worker_settings(kafka_bootstrap, migrated_database, topic, group_id)

    async with helpers.running_worker(ScriptedHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
    finished = spans.get_finished_spans()

    polls = _named(finished, f"poll {topic}")
    assert polls, f"no poll span among {[span.name for span in finished]}"
    assert {span.kind for span in polls} == {SpanKind.CLIENT}
    assert sum(_attribute(span, "messaging.batch.message_count") for span in polls) == 2
    assert {_attribute(span, "messaging.operation.type") for span in polls} == {"receive"}
    assert {_attribute(span, "messaging.consumer.group.name") for span in polls} == {group_id}
    assert {_attribute(span, "messaging.system") for span in polls} == {"kafka"}
    assert {_attribute(span, "messaging.destination.partition.id") for span in polls} == {"0"}

    batches = _named(finished, f"process {topic}")
    assert batches
    assert {span.kind for span in batches} == {SpanKind.CONSUMER}
    assert all(span.parent is None for span in batches), "a batch span starts a trace of its own"
    assert sum(_attribute(span, "consumer.batch.applied") for span in batches) == 2
    assert {_attribute(span, "consumer.batch.result") for span in batches} == {"committed"}
    assert {_attribute(span, "messaging.destination.name") for span in batches} == {topic}
    assert {_attribute(span, "messaging.destination.partition.id") for span in batches} == {"0"}
    assert {_attribute(span, "messaging.consumer.group.name") for span in batches} == {group_id}
    assert sum(_attribute(span, "messaging.batch.message_count") for span in batches) == 2
    assert {_attribute(span, "consumer.batch.next_offset") for span in batches} <= {1, 2}

    handled = _handler_spans_by_offset(finished, topic)
    assert sorted(handled) == [0, 1]
    assert [len(calls) for calls in handled.values()] == [1, 1]
    first, second = handled[0][0], handled[1][0]
    batch_ids = {(span.context.trace_id, span.context.span_id) for span in batches}
    for span in (first, second):
        assert span.kind is SpanKind.CONSUMER
        assert span.status.status_code is StatusCode.UNSET
        assert span.parent is not None
        assert (span.parent.trace_id, span.parent.span_id) in batch_ids, "a handler span is a child of its batch"
        assert _attribute(span, "messaging.system") == "kafka"
        assert _attribute(span, "messaging.operation.type") == "process"
        assert _attribute(span, "messaging.destination.name") == topic
        assert _attribute(span, "messaging.consumer.group.name") == group_id
        assert _attribute(span, "consumer.handler.name") == ScriptedHandler.name()
        assert _attribute(span, "consumer.handler.attempt") == 1
    assert len(first.links) == 1
    link = first.links[0].context
    assert link.trace_id == trace_id
    assert link.span_id == span_id
    assert link.is_remote
    assert link.trace_state.get("vendor") == "opaque"
    assert first.context.trace_id != trace_id, "the producer's trace is linked, not continued"
    assert second.links == (), "a message without trace context gets no link"


async def test_publish_carries_handler_context(
    kafka_bootstrap: str, topic_factory: Callable[..., str], migrated_database: str, rows: Rows, spans: Any
) -> None:
    topic = topic_factory()
    out_topic = topic_factory(prefix="out")
    group_id = helpers.unique_group("trace")
    _, _, incoming = _traceparent()
    own_trace_id, own_span_id, own = _traceparent()
    records = [
        _record({"id": 0, "publish_to": out_topic}, [("traceparent", incoming)]),
        _record({"id": 1, "publish_to": out_topic, "publish_traceparent": own.decode()}),
    ]
    await kafka.produce(kafka_bootstrap, topic, records)
    config = helpers.worker_settings(kafka_bootstrap, migrated_database, topic, group_id)

    async with helpers.running_worker(ScriptedHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
        published = await kafka.consume(kafka_bootstrap, out_topic, group_id=helpers.unique_group("reader"), count=2)
    handled = _handler_spans_by_offset(spans.get_finished_spans(), topic)

    by_key = {record.key: record for record in published}
    headers = {key: [(name, value) for name, value in record.headers] for key, record in by_key.items()}
    first_parents = [value for name, value in headers[b"0"] if name == "traceparent"]
    assert len(first_parents) == 1
    assert first_parents[0] is not None
    trace_id, parent_span_id = _parse_traceparent(first_parents[0])
    assert trace_id == handled[0][0].context.trace_id
    assert parent_span_id == handled[0][0].context.span_id
    assert any(name == "Idempotency-Key" for name, _ in headers[b"0"])
    second_parents = [value for name, value in headers[b"1"] if name == "traceparent"]
    assert second_parents == [own], "a traceparent the handler set itself is kept"
    assert _parse_traceparent(own) == (own_trace_id, own_span_id)


async def test_failing_handler_span_has_error_status(
    kafka_bootstrap: str, topic_factory: Callable[..., str], migrated_database: str, rows: Rows, spans: Any
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group("trace")
    await kafka.produce(
        kafka_bootstrap, topic, [_record({"id": 0}), _record({"id": 1, "fail": True}), _record({"id": 2})]
    )
    config = helpers.worker_settings(kafka_bootstrap, migrated_database, topic, group_id)

    async with helpers.running_worker(ScriptedHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
    finished = spans.get_finished_spans()
    handled = _handler_spans_by_offset(finished, topic)
    batches = _named(finished, f"process {topic}")

    failed = handled[1]
    assert sorted(_attribute(span, "consumer.handler.attempt") for span in failed) == [1, 2, 3]
    for span in failed:
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ValueError: message 1 is marked to fail"
        assert _attribute(span, "error.type") == "ValueError"
        exceptions = [event for event in span.events if event.name == "exception"]
        assert len(exceptions) == 1
        assert exceptions[0].attributes is not None
        assert exceptions[0].attributes["exception.type"] == "ValueError"
    for span in handled[0] + handled[2]:
        assert span.status.status_code is StatusCode.UNSET
    rolled_back = [span for span in batches if _attribute(span, "consumer.batch.result") == "rolled_back"]
    assert len(rolled_back) == 1, "only the fast path rolls back; the redo uses savepoints"
    assert rolled_back[0].status.status_code is StatusCode.ERROR
    assert _attribute(rolled_back[0], "error.type") == "ValueError"
    assert _attribute(rolled_back[0], "consumer.batch.failed_offset") == 1
    assert _attribute(rolled_back[0], "consumer.batch.savepoints") is False
    assert sum(_attribute(span, "consumer.batch.dead_lettered") or 0 for span in batches) == 1
    assert sum(_attribute(span, "consumer.batch.applied") or 0 for span in batches) == 2


async def test_batch_handler_span_links_every_message(
    kafka_bootstrap: str, topic_factory: Callable[..., str], migrated_database: str, rows: Rows, spans: Any
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group("trace")
    contexts = [_traceparent() for _ in range(4)]
    records = [_record({"id": number}, [("traceparent", header)]) for number, (_, _, header) in enumerate(contexts)]
    await kafka.produce(kafka_bootstrap, topic, records)
    config = helpers.worker_settings(kafka_bootstrap, migrated_database, topic, group_id)
    handler = RecordingBatchHandler()

    async with helpers.running_worker(handler, config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 4})
    calls = _named(spans.get_finished_spans(), f"handle {topic}")

    assert len(calls) == len(handler.calls)
    for span, offsets in zip(sorted(calls, key=lambda span: span.start_time or 0), handler.calls, strict=True):
        assert len(span.links) == len(offsets)
        if len(offsets) > 1:
            assert _attribute(span, "messaging.batch.message_count") == len(offsets)
            assert _attribute(span, "messaging.kafka.offset") is None
        else:
            assert _attribute(span, "messaging.kafka.offset") == offsets[0]
    linked = [link.context.trace_id for span in calls for link in span.links]
    assert sorted(linked) == sorted(trace_id for trace_id, _, _ in contexts)
