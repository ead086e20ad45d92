"""The report behind ``consumer status``: stored positions, broker end offsets and lag per partition.

PostgreSQL is the source of truth for progress, so the report starts from the
``positions`` table and reads only end offsets from the broker. Without a
broker (``--no-broker``, no bootstrap servers, or a broker that does not
respond in time) the end offsets and lag are reported as unknown, with the
reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from consumer import db, errors, kafka
from consumer.settings import KafkaSettings, Settings

__all__ = [
    "BROKER_NOT_CONFIGURED",
    "BROKER_OK",
    "BROKER_SKIPPED",
    "BROKER_UNREACHABLE",
    "BrokerUnavailable",
    "PartitionStatus",
    "Report",
    "collect",
]

logger = logging.getLogger(__name__)

# Values of `Report.broker_status`.
BROKER_OK = "ok"
BROKER_SKIPPED = "skipped"
BROKER_NOT_CONFIGURED = "not_configured"
BROKER_UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """Progress of one partition within one dedup scope."""

    dedup_scope: str
    topic: str
    partition: int
    group_id: str
    next_offset: int
    high_water: int
    # None when the broker was not queried, did not respond, or has no such partition.
    end_offset: int | None
    applied: int
    position_duplicates: int
    key_duplicates: int
    dead_lettered: int
    dead_letters_dead: int
    dead_letters_parked: int
    updated_at: datetime

    @property
    def lag(self) -> int | None:
        """Messages between the stored position and the broker's end offset.

        Negative when the stored position is past the end offset, for
        example after the topic was deleted and created again.
        """
        return None if self.end_offset is None else self.end_offset - self.next_offset

    def as_json(self) -> dict[str, Any]:
        return {
            "dedup_scope": self.dedup_scope,
            "topic": self.topic,
            "partition": self.partition,
            "group_id": self.group_id,
            "next_offset": self.next_offset,
            "high_water": self.high_water,
            "end_offset": self.end_offset,
            "lag": self.lag,
            "last_processed_at": self.updated_at.isoformat(),
            "applied": self.applied,
            "position_duplicates": self.position_duplicates,
            "key_duplicates": self.key_duplicates,
            "dead_lettered": self.dead_lettered,
            "dead_letters_dead": self.dead_letters_dead,
            "dead_letters_parked": self.dead_letters_parked,
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Every stored partition, and whether the broker's end offsets are known."""

    partitions: list[PartitionStatus]
    broker_status: str
    # Why the end offsets are unknown, for every status but BROKER_OK.
    broker_detail: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "broker": {"status": self.broker_status, "detail": self.broker_detail},
            "partitions": [partition.as_json() for partition in self.partitions],
        }

    def render(self) -> str:
        """Return the report as one table per dedup scope, for people."""
        if not self.partitions:
            return "no stored positions: nothing has been committed yet, or --group names no dedup scope"
        blocks: list[str] = []
        scopes = sorted({partition.dedup_scope for partition in self.partitions})
        for scope in scopes:
            rows = [partition for partition in self.partitions if partition.dedup_scope == scope]
            blocks.append(f"dedup scope {scope}\n{_table(rows)}")
        if self.broker_status != BROKER_OK:
            blocks.append(f"end offsets and lag unknown: {self.broker_detail}")
        return "\n\n".join(blocks)


class BrokerUnavailable(errors.InfrastructureError):
    """The broker did not return end offsets; the report shows them as unknown."""


async def collect(
    config: Settings,
    *,
    dedup_scope: str | None,
    use_broker: bool,
    broker_timeout_s: float,
) -> Report:
    """Read the stored positions and, when possible, the broker's end offsets."""
    rows = await _stored_partitions(config, dedup_scope)
    partitions = [(row["topic"], row["partition"]) for row in rows]

    if not use_broker:
        end_offsets: dict[tuple[str, int], int] = {}
        broker_status, detail = BROKER_SKIPPED, "the broker was not queried (--no-broker)"
    elif not config.kafka.bootstrap_servers:
        end_offsets = {}
        broker_status, detail = BROKER_NOT_CONFIGURED, "CONSUMER_KAFKA__BOOTSTRAP_SERVERS is not set"
    elif not partitions:
        end_offsets = {}
        broker_status, detail = BROKER_OK, None
    else:
        try:
            end_offsets = await _end_offsets(config.kafka, partitions, broker_timeout_s)
        except BrokerUnavailable as exc:
            end_offsets = {}
            broker_status, detail = BROKER_UNREACHABLE, str(exc)
        else:
            broker_status, detail = BROKER_OK, None

    statuses = [_partition_status(row, end_offsets.get((row["topic"], row["partition"]))) for row in rows]
    return Report(partitions=statuses, broker_status=broker_status, broker_detail=detail)


async def _stored_partitions(config: Settings, dedup_scope: str | None) -> list[asyncpg.Record]:
    schema = config.postgres.schema_name
    queries = db.load_queries("status.sql", schema)
    connection = await db.connect(config.postgres)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(queries.partitions, dedup_scope)
    except asyncpg.UndefinedTableError as exc:
        raise errors.MigrationError(
            f"schema {schema} has no positions table; run `consumer migrate` or set CONSUMER_POSTGRES__SCHEMA"
        ) from exc
    finally:
        await connection.close()
    return rows


async def _end_offsets(
    settings: KafkaSettings, partitions: Sequence[tuple[str, int]], timeout_s: float
) -> dict[tuple[str, int], int]:
    """Return the end offset of each partition the broker has; raise `BrokerUnavailable` on failure.

    Under ``read_committed`` (the default isolation level) the end offset is
    the last stable offset, the end that a worker can read up to.
    """
    # No group id: this client only reads metadata and offsets, and never
    # joins or disturbs the workers' group.
    client = kafka.consumer(settings, None)
    servers = ",".join(settings.bootstrap_servers)
    try:
        with anyio.fail_after(timeout_s):
            await client.start()
            on_broker = await _existing(client, partitions)
            offsets = await client.end_offsets(on_broker) if on_broker else {}
    except TimeoutError:
        raise BrokerUnavailable(f"the broker at {servers} did not respond within {timeout_s:g} s") from None
    except KafkaError as exc:
        # aiokafka's messages often start with the class name already.
        detail = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
        raise BrokerUnavailable(f"the broker at {servers} failed: {detail}") from None
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(KafkaError):
            await client.stop()
    return {(tp.topic, tp.partition): int(offset) for tp, offset in offsets.items()}


async def _existing(client: Any, partitions: Sequence[tuple[str, int]]) -> list[TopicPartition]:
    """Return the partitions the broker has, because a request for any other waits for the request timeout."""
    topics = await client.topics()
    existing: list[TopicPartition] = []
    for topic, partition in partitions:
        if topic in topics and partition in (client.partitions_for_topic(topic) or set()):
            existing.append(TopicPartition(topic, partition))
        else:
            logger.warning(
                "%s-%d has a stored position but is not on the broker",
                topic,
                partition,
                extra={"action": "status_partition_missing", "topic": topic, "partition": partition},
            )
    return existing


def _partition_status(row: asyncpg.Record, end_offset: int | None) -> PartitionStatus:
    return PartitionStatus(
        dedup_scope=row["dedup_scope"],
        topic=row["topic"],
        partition=row["partition"],
        group_id=row["group_id"],
        next_offset=row["next_offset"],
        high_water=row["high_water"],
        end_offset=end_offset,
        applied=row["applied"],
        position_duplicates=row["position_duplicates"],
        key_duplicates=row["key_duplicates"],
        dead_lettered=row["dead_lettered"],
        dead_letters_dead=row["dead_letters_dead"],
        dead_letters_parked=row["dead_letters_parked"],
        updated_at=row["updated_at"],
    )


_COLUMNS = (
    "TOPIC",
    "PARTITION",
    "POSITION",
    "END",
    "LAG",
    "LAST PROCESSED (UTC)",
    "APPLIED",
    "DUPLICATES",
    "DEAD-LETTERED",
    "DEAD NOW",
)


def _table(partitions: list[PartitionStatus]) -> str:
    """Format `partitions` as aligned columns: text left, numbers right."""
    rows = [
        (
            partition.topic,
            str(partition.partition),
            str(partition.next_offset),
            "?" if partition.end_offset is None else str(partition.end_offset),
            "?" if partition.lag is None else str(partition.lag),
            partition.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            str(partition.applied),
            str(partition.position_duplicates + partition.key_duplicates),
            str(partition.dead_lettered),
            str(partition.dead_letters_dead),
        )
        for partition in partitions
    ]
    widths = [max(len(cells[index]) for cells in [_COLUMNS, *rows]) for index in range(len(_COLUMNS))]
    lines = []
    for cells in [_COLUMNS, *rows]:
        padded = [
            cell.ljust(width) if index in (0, 5) else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)
