"""Offsets without a message (transaction markers, aborted records) leave the position and the lag right.

The worker runs in the test process, so the test can read its lag gauge.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.integration import helpers as integration
from tests.replay.conftest import StackFactory
from tests.replay.handlers import InProcessOrderHandler
from tests.replay.helpers import Rows, order_record, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _send_in_transaction(producer: AIOKafkaProducer, topic: str, keys: list[str], *, commit: bool) -> None:
    await producer.begin_transaction()
    for key in keys:
        record = order_record(key)
        await producer.send_and_wait(topic, value=record.value, key=record.key, partition=0, headers=record.headers)
    if commit:
        await producer.commit_transaction()
    else:
        await producer.abort_transaction()


async def _end_offset(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        end: int = (await consumer.end_offsets([tp]))[tp]
        return end
    finally:
        await consumer.stop()


async def test_transaction_markers_leave_no_lag(
    make_stack: StackFactory, kafka_bootstrap: str, database_url: str, kafka_is_tansu: bool
) -> None:
    if kafka_is_tansu:
        pytest.skip(
            "Tansu 0.6 responds to InitProducerId with UnknownError, so no transactional producer can write "
            "commit or abort markers. Set CONSUMER_TEST_KAFKA_BOOTSTRAP to run this against Kafka."
        )
    stack, rows = await make_stack(1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"replay-{uuid.uuid4().hex}")
    await producer.start()
    try:
        # Offsets 0-1 orders, 2 commit marker, 3-4 aborted, 5 abort marker,
        # 6-7 orders, 8 commit marker.
        await _send_in_transaction(producer, stack.topic, ["k-0", "k-1"], commit=True)
        await _send_in_transaction(producer, stack.topic, ["a-0", "a-1"], commit=False)
        await _send_in_transaction(producer, stack.topic, ["k-2", "k-3"], commit=True)
    finally:
        await producer.stop()
    end = await _end_offset(kafka_bootstrap, stack.topic)
    assert end == 9
    config = integration.worker_settings(kafka_bootstrap, database_url, stack.topic, stack.group_id)

    async with integration.running_worker(InProcessOrderHandler(), config) as worker:
        await wait_until(lambda: _has_effects(rows, 4), timeout_s=30, description="four effects")
        await rows.wait_for_next_offsets({0: end}, timeout_s=10)
        worker.update_gauges()
        labels = {"group": stack.group_id, "topic": stack.topic, "partition": "0"}
        lag = worker.metrics.registry.get_sample_value("consumer_partition_lag_messages", labels)

    assert await rows.effects_per_key() == {"k-0": 1, "k-1": 1, "k-2": 1, "k-3": 1}
    assert lag == 0
    [plan] = await stack.plan("--to-earliest")
    assert plan["end"] == end
    assert plan["position_duplicates"] == 4
    assert plan["would_apply"] == 0


async def _has_effects(rows: Rows, count: int) -> bool:
    return await rows.effect_count() >= count
