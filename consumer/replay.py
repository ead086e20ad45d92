"""Replays: move a group's stored position, count beforehand what would apply, reprocess a range on purpose.

A replay changes ``positions.next_offset`` (and bumps ``epoch``) under the
row lock that fences every batch transaction. A running worker finishes its
in-flight batch, then its next transaction sees the new epoch, drops what it
fetched and seeks to the new position; a stopped worker seeks there when it
starts. So there is never a moment when two positions are in effect.

Moving a position back does not reopen duplicates: offsets below the
high-water mark stay position duplicates, and keyed messages are checked
against their dedup records. Only ``reprocess`` applies messages again, for
an explicit offset range of one partition: it deletes the dedup records of
exactly that range and lets the worker apply those offsets once more.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer import errors, kafka
from consumer.handler import Handler, build_message
from consumer.message import RawMessage
from consumer.settings import Settings

__all__ = ["PartitionPlan", "Target", "apply_moves", "plan", "reprocess"]

logger = logging.getLogger(__name__)

_FETCH_TIMEOUT_MS = 1000
_READ_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Target:
    """Target of a replay: an offset, a time, the log start or the log end."""

    kind: Literal["offset", "timestamp", "earliest", "end"]
    offset: int | None = None
    timestamp: datetime | None = None


@dataclass(slots=True)
class PartitionPlan:
    """Forecast of a replay of one partition, read from the broker and the database without writing."""

    partition: int
    current: int | None
    high_water: int | None
    target: int
    end: int
    log_start: int
    would_apply: int = 0
    position_duplicates: int = 0
    key_duplicates: int = 0
    conflicts: int = 0
    would_dead_letter: int = 0
    # Messages between the current position and a forward target: never applied.
    skipped_forward: int = 0
    # Offsets of the range the broker no longer holds.
    not_retained: int = 0
    oldest_timestamp_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _Seen:
    fingerprints: dict[str, bytes] = field(default_factory=dict)


async def plan(
    settings: Settings,
    connection: asyncpg.Connection,
    queries: Any,
    handler: Handler[Any],
    *,
    dedup_scope: str,
    topic: str,
    partitions: list[int] | None,
    target: Target,
    reprocess_range: tuple[int, int] | None = None,
) -> list[PartitionPlan]:
    """Count, per partition, what moving to `target` would apply, skip and miss. Writes nothing."""
    consumer = kafka.consumer(settings.kafka, None)
    await consumer.start()
    try:
        chosen = _partitions(consumer, topic, partitions)
        tps = [TopicPartition(topic, partition) for partition in chosen]
        log_start = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        targets = await _resolve(consumer, tps, target, log_start, end)
        rows = await connection.fetch(queries.positions_of_topic, dedup_scope, topic)
        stored = {row["partition"]: row for row in rows}
        plans: list[PartitionPlan] = []
        seen = _Seen()
        for tp in tps:
            row = stored.get(tp.partition)
            partition_plan = PartitionPlan(
                partition=tp.partition,
                current=row["next_offset"] if row else None,
                high_water=row["high_water"] if row else None,
                target=targets[tp],
                end=end[tp],
                log_start=log_start[tp],
            )
            records = await _read(consumer, tp, max(targets[tp], log_start[tp]), end[tp])
            await _classify(connection, queries, handler, dedup_scope, partition_plan, records, seen, reprocess_range)
            plans.append(partition_plan)
        return plans
    finally:
        await consumer.stop()


def _partitions(consumer: AIOKafkaConsumer, topic: str, partitions: list[int] | None) -> list[int]:
    available = consumer.partitions_for_topic(topic)
    if not available:
        raise errors.ConfigurationError(f"topic {topic!r} does not exist or has no partitions; check --topic")
    if partitions is None:
        return sorted(available)
    missing = sorted(set(partitions) - set(available))
    if missing:
        raise errors.ConfigurationError(f"topic {topic!r} has no partition {missing}; it has {sorted(available)}")
    return sorted(partitions)


async def _resolve(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    target: Target,
    log_start: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
) -> dict[TopicPartition, int]:
    if target.kind == "earliest":
        return dict(log_start)
    if target.kind == "end":
        return dict(end)
    if target.kind == "offset":
        assert target.offset is not None
        return {tp: target.offset for tp in tps}
    assert target.timestamp is not None
    found = await consumer.offsets_for_times({tp: int(target.timestamp.timestamp() * 1000) for tp in tps})
    return {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}


async def _read(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int) -> list[RawMessage]:
    """Read `tp` from `start` up to `end` (exclusive)."""
    if start >= end:
        return []
    consumer.assign([tp])
    consumer.seek(tp, start)
    records: list[RawMessage] = []
    deadline = time.monotonic() + _READ_TIMEOUT_S
    while True:
        fetched = await consumer.getmany(tp, timeout_ms=_FETCH_TIMEOUT_MS)
        for record in fetched.get(tp, []):
            if record.offset < end:
                records.append(
                    RawMessage(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        key=record.key,
                        value=record.value,
                        headers=tuple(record.headers),
                        timestamp_ms=record.timestamp,
                    )
                )
        position = await consumer.position(tp)
        if position >= end:
            return records
        if time.monotonic() > deadline:
            raise errors.InfrastructureError(
                f"reading {tp.topic}-{tp.partition} from {start} to {end} took longer than {_READ_TIMEOUT_S:.0f}s"
            )


async def _classify(
    connection: asyncpg.Connection,
    queries: Any,
    handler: Handler[Any],
    dedup_scope: str,
    partition_plan: PartitionPlan,
    records: list[RawMessage],
    seen: _Seen,
    reprocess_range: tuple[int, int] | None,
) -> None:
    """Sort each message of the range the way the batch transaction would."""
    plan_ = partition_plan
    plan_.not_retained = max(0, plan_.log_start - plan_.target)
    if plan_.current is not None and plan_.target > plan_.current:
        plan_.skipped_forward = plan_.target - plan_.current
    if records:
        plan_.oldest_timestamp_ms = records[0].timestamp_ms
    high_water = plan_.high_water if plan_.high_water is not None else -1
    candidates: list[tuple[RawMessage, str | None, bytes]] = []
    for raw in records:
        in_reprocess = reprocess_range is not None and reprocess_range[0] <= raw.offset < reprocess_range[1]
        if raw.offset < high_water and not in_reprocess:
            plan_.position_duplicates += 1
            continue
        try:
            message = build_message(handler, raw)
        except errors.DecodeError:
            plan_.would_dead_letter += 1
            continue
        candidates.append((raw, message.idempotency_key if message.keyed else None, handler.fingerprint(message)))

    keys = sorted({key for _, key, _ in candidates if key is not None})
    stored: dict[str, asyncpg.Record] = {}
    if keys:
        rows = await connection.fetch(queries.stored_keys, dedup_scope, keys)
        stored = {row["idempotency_key"]: row for row in rows}
    for raw, key, own_fingerprint in candidates:
        if key is None:
            plan_.would_apply += 1
            continue
        row = stored.get(key)
        cleared = (
            row is not None
            and reprocess_range is not None
            and row["topic"] == raw.topic
            and row["partition"] == raw.partition
            and reprocess_range[0] <= row["offset"] < reprocess_range[1]
        )
        fingerprint = bytes(row["fingerprint"]) if row is not None and not cleared else seen.fingerprints.get(key)
        if fingerprint is None:
            plan_.would_apply += 1
            seen.fingerprints[key] = own_fingerprint
        elif fingerprint == own_fingerprint:
            plan_.key_duplicates += 1
        else:
            plan_.conflicts += 1


async def apply_moves(
    connection: asyncpg.Connection,
    queries: Any,
    *,
    dedup_scope: str,
    group_id: str,
    topic: str,
    plans: list[PartitionPlan],
) -> None:
    """Store each plan's target as the partition's position, in one transaction under the fence locks."""
    async with connection.transaction():
        await connection.fetch(queries.lock_positions, dedup_scope, topic, [p.partition for p in plans])
        for partition_plan in plans:
            target = max(partition_plan.target, partition_plan.log_start)
            await connection.execute(
                queries.move_position, dedup_scope, topic, partition_plan.partition, target, group_id
            )
    for partition_plan in plans:
        logger.info(
            "position of %s-%d moved from %s to %d",
            topic,
            partition_plan.partition,
            partition_plan.current,
            max(partition_plan.target, partition_plan.log_start),
            extra={"action": "position_replayed", "topic": topic, "partition": partition_plan.partition},
        )


async def reprocess(
    connection: asyncpg.Connection,
    queries: Any,
    *,
    dedup_scope: str,
    topic: str,
    partition: int,
    start: int,
    until: int,
) -> int:
    """Clear the dedup records of ``[start, until)`` and move the position to `start`; return records cleared."""
    async with connection.transaction():
        rows = await connection.fetch(queries.lock_positions, dedup_scope, topic, [partition])
        if not rows:
            raise errors.ConfigurationError(
                f"{topic}-{partition} has no stored position in scope {dedup_scope!r}; nothing was applied there"
            )
        high_water = rows[0]["high_water"]
        if until > high_water:
            raise errors.ConfigurationError(
                f"--until-offset {until} is past what was applied ({high_water}); reprocess only applied offsets"
            )
        status: str = await connection.execute(queries.clear_range, dedup_scope, topic, partition, start, until)
        await connection.execute(queries.start_reprocess, dedup_scope, topic, partition, start, until)
    cleared = int(status.split()[-1])
    logger.info(
        "reprocessing %s-%d offsets %d to %d (%d dedup records cleared)",
        topic,
        partition,
        start,
        until - 1,
        cleared,
        extra={"action": "reprocess_started", "topic": topic, "partition": partition, "offset": start},
    )
    return cleared
