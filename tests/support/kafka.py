"""Produce, consume and inspect Kafka records from tests.

The helpers work against Tansu 0.6 as well as real Kafka, so each avoids a
request that Tansu 0.6 gets wrong. The NOTE at each spot names the bug.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

__all__ = [
    "ConsumedRecord",
    "Record",
    "consume",
    "delete_topics",
    "fetch_committed",
    "produce",
    "unique_topic_name",
]

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Record:
    """One record to produce to a given partition."""

    partition: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True)
class ConsumedRecord:
    """One record read back from Kafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers


def unique_topic_name(prefix: str = "test") -> str:
    """Return ``prefix`` followed by a random 48-bit hex suffix, so two tests are very unlikely to share a topic."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def produce(bootstrap_servers: str, topic: str, records: Iterable[Record]) -> list[int]:
    """Send ``records`` in order, one request each, and return their offsets in the same order."""
    # NOTE: Tansu 0.6 returns UnknownError to InitProducerId, so idempotence is
    # off. Each record gets its own request because after one batch of five
    # records at offsets 0 to 4, Tansu 0.6 returned 1 as the latest offset
    # (ListOffsets) instead of 5.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        offsets: list[int] = []
        for record in records:
            metadata = await producer.send_and_wait(
                topic,
                value=record.value,
                key=record.key,
                partition=record.partition,
                headers=list(record.headers),
            )
            offsets.append(metadata.offset)
        return offsets
    finally:
        await producer.stop()


async def consume(
    bootstrap_servers: str,
    topic: str,
    *,
    group_id: str,
    count: int,
    timeout_s: float = 20.0,
    commit: bool = True,
    session_timeout_s: float = 6.0,
) -> list[ConsumedRecord]:
    """Join ``group_id``, read ``count`` records of ``topic`` from the committed or earliest offset, and leave.

    Commits the offsets read when ``commit`` is true. Raises AssertionError when
    fewer than ``count`` records arrive within ``timeout_s`` seconds.
    """
    # NOTE: Tansu 0.6 responds to the first JoinGroup of a new group only after
    # half the session timeout (measured: 20 s, 10 s and 2 s gave 10 s, 5 s and
    # 1 s). The default of 6 s is the smallest session timeout that Kafka
    # accepts by default (group.min.session.timeout.ms).
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=int(session_timeout_s * 1000),
        heartbeat_interval_ms=int(session_timeout_s * 1000 / 3),
    )
    await consumer.start()
    try:
        received: list[ConsumedRecord] = []
        deadline = time.monotonic() + timeout_s
        while len(received) < count:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise AssertionError(
                    f"read {len(received)} of {count} records from {topic!r} within {timeout_s} s: {received!r}"
                )
            batches = await consumer.getmany(timeout_ms=int(min(remaining_s, 1.0) * 1000))
            for messages in batches.values():
                received.extend(_to_consumed(message) for message in messages)
        if commit:
            await consumer.commit()
        return received
    finally:
        await consumer.stop()


async def fetch_committed(
    bootstrap_servers: str,
    group_id: str,
    topic: str,
    partitions: int | Iterable[int],
) -> dict[int, int | None]:
    """Return the committed offset of ``group_id`` for each partition, or None where nothing is committed.

    ``partitions`` is a partition count or the partition numbers to read.
    """
    # NOTE: aiokafka 0.14's admin list_consumer_group_offsets cannot decode
    # Tansu 0.6's OffsetFetch response ("unpack requires a buffer of 4 bytes"),
    # then the connection closes. A consumer that never subscribes, and so never
    # joins the group, reads the offsets instead.
    numbers = range(partitions) if isinstance(partitions, int) else list(partitions)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        committed: dict[int, int | None] = {}
        for number in numbers:
            committed[number] = await consumer.committed(TopicPartition(topic, number))
        return committed
    finally:
        await consumer.stop()


async def delete_topics(bootstrap_servers: str, topics: Sequence[str], *, timeout_s: float = 10.0) -> None:
    """Delete ``topics``, and raise AssertionError naming each topic the broker did not delete."""
    from aiokafka.admin import AIOKafkaAdminClient

    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()
        response = await admin.delete_topics(list(topics), timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise AssertionError(f"deleting topics {list(topics)} failed: {exc!r}") from exc
    finally:
        await admin.close()

    failed = {topic: code for topic, code, *_ in response.topic_error_codes if code != 0}
    assert not failed, f"broker did not delete these topics (topic: error code): {failed}"


def _to_consumed(message: Any) -> ConsumedRecord:
    """Copy the fields of an aiokafka ConsumerRecord."""
    return ConsumedRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=list(message.headers),
    )
