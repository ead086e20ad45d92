"""The two reference systems: a raw aiokafka drain (the ceiling) and an at-least-once baseline loop.

Both join a fresh consumer group and read the topic from the start. Timing
starts when the first fetch returns records, so the group join (Tansu 0.6
responds to a new group's first JoinGroup only after half the session timeout)
is left out, as it is for the framework.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from benchmarks.database import EFFECT_INSERT
from benchmarks.handlers import effect_row
from benchmarks.stream import Topic

__all__ = ["Drained", "baseline", "group_consumer", "raw_drain"]

# Records one fetch returns: one transaction per 500 messages, the batch size of the worker (worker.max_batch_size).
MAX_RECORDS = 500
POLL_TIMEOUT_MS = 200
# The smallest session timeout Kafka accepts by default, which keeps Tansu's join delay at 3 s.
SESSION_TIMEOUT_MS = 6_000
RUN_TIMEOUT_S = 600.0


@dataclass
class Drained:
    """How long a system took from its first fetch until the end of every partition."""

    messages: int
    seconds: float
    # (partition, next offset, time.time()) after each committed batch, for latency runs.
    commits: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def group_consumer(bootstrap_servers: str, topic: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"bench-{uuid.uuid4().hex[:12]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=SESSION_TIMEOUT_MS // 3,
    )


async def raw_drain(bootstrap_servers: str, topic: Topic, *, ready: Callable[[], None] | None = None) -> Drained:
    """Fetch every record and do nothing with it: what the broker and aiokafka allow."""
    consumer = group_consumer(bootstrap_servers, topic.name)
    await consumer.start()
    try:
        return await _drain(consumer, topic, _ignore, ready=ready)
    finally:
        await consumer.stop()


async def baseline(
    bootstrap_servers: str,
    database_url: str,
    topic: Topic,
    *,
    executemany: bool = True,
    ready: Callable[[], None] | None = None,
) -> Drained:
    """Write one effect row per message, one transaction per fetch of up to 500, then commit the offsets.

    This is the usual at-least-once loop: no dedup, and a crash between the
    database commit and the Kafka commit applies the batch again. With
    `executemany` False it runs one INSERT per message, as a per-message
    handler does. `ready` is called once the group is joined.
    """
    connection = await asyncpg.connect(database_url)
    consumer = group_consumer(bootstrap_servers, topic.name)
    await consumer.start()
    try:

        async def apply(records: list[ConsumerRecord[bytes, bytes]]) -> None:
            rows = [
                effect_row(record.topic, record.partition, record.offset, json.loads(record.value))
                for record in records
            ]
            async with connection.transaction():
                if executemany:
                    await connection.executemany(EFFECT_INSERT, rows)
                else:
                    for row in rows:
                        await connection.execute(EFFECT_INSERT, *row)
            await consumer.commit(_next_offsets(records))

        return await _drain(consumer, topic, apply, ready=ready)
    finally:
        await consumer.stop()
        await connection.close()


async def _ignore(records: list[ConsumerRecord[bytes, bytes]]) -> None:
    return None


async def _drain(
    consumer: AIOKafkaConsumer,
    topic: Topic,
    apply: Callable[[list[ConsumerRecord[bytes, bytes]]], object],
    *,
    ready: Callable[[], None] | None = None,
) -> Drained:
    """Fetch and `apply` until every partition reaches its end offset; time from the first records."""
    positions = {partition: 0 for partition in topic.end_offsets}
    count = 0
    started: float | None = None
    commits: list[tuple[int, int, float]] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(positions[partition] < end for partition, end in topic.end_offsets.items()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic.name}: positions {positions} did not reach {topic.end_offsets}")
        if ready is not None and consumer.assignment():
            ready()
            ready = None
        fetched = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS)
        records = [record for batch in fetched.values() for record in batch]
        if not records:
            continue
        if started is None:
            started = time.monotonic()
        await apply(records)  # type: ignore[misc]
        committed_at = time.time()
        for tp, batch in fetched.items():
            positions[tp.partition] = batch[-1].offset + 1
            commits.append((tp.partition, positions[tp.partition], committed_at))
        count += len(records)
    assert started is not None
    return Drained(count, time.monotonic() - started, commits)


def _next_offsets(records: list[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    offsets: dict[TopicPartition, int] = {}
    for record in records:
        offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
    return offsets
