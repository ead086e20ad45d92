"""Without opentelemetry-api, tracing does nothing and the worker behaves as before.

The fixture `tracing_unavailable` imports `consumer.tracing` again while
every ``opentelemetry`` import fails, which is what a missing package looks
like to the module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition

from consumer.message import Message, RawMessage
from tests.integration import helpers
from tests.integration.helpers import Rows
from tests.support import kafka
from tests.tracing.handlers import ScriptedHandler

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _message() -> Message[Any]:
    raw = RawMessage(
        topic="orders", partition=0, offset=7, key=None, value=b"{}", headers=(("traceparent", TRACEPARENT),)
    )
    return Message(raw=raw, payload={})


@pytest.mark.unit
def test_helpers_do_nothing(tracing_unavailable: ModuleType) -> None:
    spec = SimpleNamespace(group_id="orders-store")
    headers: list[tuple[str, bytes | None]] = [("Idempotency-Key", b"k-1")]

    tracing_unavailable.record_poll({TopicPartition("orders", 0): [object()]}, "orders-store", 0)
    tracing_unavailable.add_trace_context(headers)
    with tracing_unavailable.batch_span(spec, [_message().raw], savepoints=False) as span:
        span.record(SimpleNamespace())
    with tracing_unavailable.handler_span(spec, [_message()], attempt=1):
        pass

    assert tracing_unavailable.AVAILABLE is False
    assert span.span is None
    assert headers == [("Idempotency-Key", b"k-1")]


@pytest.mark.unit
def test_handler_error_passes_through(tracing_unavailable: ModuleType) -> None:
    spec = SimpleNamespace(group_id="orders-store")

    with pytest.raises(ValueError, match="bad order"), tracing_unavailable.handler_span(spec, [_message()], attempt=1):
        raise ValueError("bad order")


@pytest.mark.integration
@pytest.mark.anyio
async def test_worker_publishes_without_trace_headers(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    migrated_database: str,
    rows: Rows,
    tracing_unavailable: ModuleType,
) -> None:
    topic = topic_factory()
    out_topic = topic_factory(prefix="out")
    group_id = helpers.unique_group("untraced")
    payload = {"id": 0, "publish_to": out_topic}
    record = kafka.Record(key=b"0", value=json.dumps(payload).encode(), headers=[("traceparent", TRACEPARENT)])
    await kafka.produce(kafka_bootstrap, topic, [record])
    config = helpers.worker_settings(kafka_bootstrap, migrated_database, topic, group_id)

    async with helpers.running_worker(ScriptedHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 1})
    connection: asyncpg.Connection = rows.connection
    outbox = await connection.fetch("SELECT topic, header_names FROM consumer.outbox")

    assert tracing_unavailable.AVAILABLE is False
    assert [(row["topic"], row["header_names"]) for row in outbox] == [(out_topic, ["Idempotency-Key"])]
