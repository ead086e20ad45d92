"""The dead-letter store: messages that could not be applied, with their raw bytes.

A dead letter is written in the batch transaction that moves the partition
past its message, so a message is never skipped without a row here. Key,
value and headers are stored as the broker delivered them (bytes, header
order, repeated names and null values included), so a redrive sees exactly
the original message.

With ``failure_mode = "park"`` a failed message with a Kafka key is stored
with status ``parked`` and its key goes into ``parked_keys``; later messages
with that key are stored as ``parked`` too (reason ``parked_behind``) until a
redrive applies them in offset order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from consumer import errors
from consumer.message import RawMessage

__all__ = ["DeadLetterWriteError", "ParkedKeys", "write"]

logger = logging.getLogger(__name__)

STATUS_DEAD = "dead"
STATUS_PARKED = "parked"
STATUS_RESOLVED = "resolved"


class DeadLetterWriteError(errors.InfrastructureError):
    """A dead letter could not be written; the partition stays at the failed message until it can."""


@dataclass(slots=True)
class ParkedKeys:
    """Kafka keys parked for one batch: loaded under a share lock, extended as messages get parked."""

    enabled: bool
    keys: set[bytes] = field(default_factory=set)

    def holds(self, raw: RawMessage) -> bool:
        return self.enabled and raw.key is not None and raw.key in self.keys


async def load_parked(
    connection: asyncpg.Connection, queries: Any, dedup_scope: str, topic: str, raws: list[RawMessage], enabled: bool
) -> ParkedKeys:
    """Read which Kafka keys of `raws` are parked; an empty set when parking is off."""
    parked = ParkedKeys(enabled=enabled)
    if not enabled:
        return parked
    keys = sorted({raw.key for raw in raws if raw.key is not None})
    if keys:
        rows = await connection.fetch(queries.parked_keys, dedup_scope, topic, keys)
        parked.keys = {bytes(row["key"]) for row in rows}
    return parked


@dataclass(frozen=True, slots=True)
class Failure:
    """Record of the attempts of a dead-lettered message."""

    reason: str
    attempts: int
    first_error_type: str
    first_error: str
    last_error_type: str
    last_error: str
    traceback: str = ""


async def write(
    connection: asyncpg.Connection,
    queries: Any,
    *,
    dedup_scope: str,
    group_id: str,
    handler_name: str,
    raw: RawMessage,
    idempotency_key: str | None,
    failure: Failure,
    status: str,
) -> None:
    """Insert (or refresh) the dead letter of `raw`; raise `DeadLetterWriteError` when PostgreSQL refuses.

    Nothing is logged here: the batch may still roll back. The processor logs
    each dead letter once its transaction committed.
    """
    try:
        await connection.execute(
            queries.insert_dead_letter,
            dedup_scope,
            group_id,
            handler_name,
            raw.topic,
            raw.partition,
            raw.offset,
            raw.timestamp_ms,
            idempotency_key,
            raw.key,
            raw.value,
            [name for name, _ in raw.headers],
            [value for _, value in raw.headers],
            failure.reason,
            failure.attempts,
            failure.first_error_type,
            failure.first_error,
            failure.last_error_type,
            failure.last_error,
            failure.traceback,
            status,
        )
    except asyncpg.PostgresError as exc:
        raise DeadLetterWriteError(
            f"cannot write the dead letter for {raw.position}: {type(exc).__name__}: {exc}; "
            "the partition stays at this message until the dead_letters table is writable again"
        ) from exc


async def publish(
    connection: asyncpg.Connection, side_queries: Any, dedup_scope: str, handler: Any, raw: RawMessage, failure: Failure
) -> None:
    """Queue the dead letter for the handler's dead-letter topic, in the same transaction, through the outbox."""
    headers = [
        *raw.headers,
        ("x-dead-letter-reason", failure.reason.encode()),
        ("x-dead-letter-error", f"{failure.last_error_type}: {failure.last_error}".encode()[:1000]),
        ("x-original-topic", raw.topic.encode()),
        ("x-original-partition", str(raw.partition).encode()),
        ("x-original-offset", str(raw.offset).encode()),
    ]
    await connection.execute(
        side_queries.insert_outbox,
        dedup_scope,
        handler.dead_letter_topic,
        raw.key,
        raw.value,
        [name for name, _ in headers],
        [value for _, value in headers],
    )


async def park_key(connection: asyncpg.Connection, queries: Any, dedup_scope: str, raw: RawMessage) -> None:
    """Park `raw`'s Kafka key, so later messages with it wait behind `raw`."""
    assert raw.key is not None
    try:
        await connection.execute(queries.park_key, dedup_scope, raw.topic, raw.key, raw.offset, raw.partition)
    except asyncpg.PostgresError as exc:
        raise DeadLetterWriteError(
            f"cannot park key of {raw.position}: {type(exc).__name__}: {exc}; "
            "the partition stays at this message until parked_keys is writable again"
        ) from exc


# -- reading and purging, for `consumer dead-letters` ---------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """Selection of dead letters for a command. Every field narrows it."""

    ids: tuple[int, ...] = ()
    dedup_scope: str | None = None
    handler: str | None = None
    topic: str | None = None
    partition: int | None = None
    key: str | None = None
    error_type: str | None = None
    reason: str | None = None
    status: str | None = None
    since: Any = None
    until: Any = None

    def is_empty(self) -> bool:
        return all(getattr(self, name) in (None, ()) for name in self.__slots__)

    def where(self) -> tuple[str, list[Any]]:
        """Return a WHERE clause of fixed fragments and its parameters."""
        fragments: list[str] = []
        values: list[Any] = []

        def add(fragment: str, value: Any) -> None:
            values.append(value)
            fragments.append(fragment.replace("?", f"${len(values)}"))

        if self.ids:
            add("id = ANY(?::bigint[])", list(self.ids))
        for column, value in (
            ("dedup_scope", self.dedup_scope),
            ("handler", self.handler),
            ("topic", self.topic),
            ("partition", self.partition),
            ("last_error_type", self.error_type),
            ("reason", self.reason),
            ("status", self.status),
        ):
            if value is not None:
                add(f"{column} = ?", value)
        if self.key is not None:
            # Matches the idempotency key or the Kafka key given as UTF-8 text.
            add("(idempotency_key = ? OR key = convert_to(?, 'UTF8'))", self.key)
        if self.since is not None:
            add("created_at >= ?", self.since)
        if self.until is not None:
            add("created_at < ?", self.until)
        clause = " AND ".join(fragments) if fragments else "TRUE"
        return clause, values


async def select(connection: asyncpg.Connection, queries: Any, selection: Filter, limit: int) -> list[asyncpg.Record]:
    """Return the dead letters matching `selection`, oldest first."""
    clause, values = selection.where()
    values.append(limit)
    sql = f"{queries.select_columns} WHERE {clause} ORDER BY id LIMIT ${len(values)}"
    rows: list[asyncpg.Record] = await connection.fetch(sql, *values)
    return rows


async def purge(connection: asyncpg.Connection, queries: Any, ids: list[int]) -> int:
    """Delete the dead letters `ids` and release parked keys left without a parked letter."""
    async with connection.transaction():
        rows = await connection.fetch(queries.delete_by_ids, ids)
        for row in rows:
            if row["status"] == STATUS_PARKED and row["key"] is not None:
                await connection.execute(queries.unpark_if_empty, row["dedup_scope"], row["topic"], row["key"])
    return len(rows)


def raw_message(row: asyncpg.Record) -> RawMessage:
    """Rebuild the original Kafka record of a dead letter, bytes unchanged."""
    headers = tuple(
        (name, bytes(value) if value is not None else None)
        for name, value in zip(row["header_names"], row["header_values"], strict=True)
    )
    return RawMessage(
        topic=row["topic"],
        partition=row["partition"],
        offset=row["offset"],
        key=bytes(row["key"]) if row["key"] is not None else None,
        value=bytes(row["value"]) if row["value"] is not None else None,
        headers=headers,
        timestamp_ms=row["timestamp_ms"],
    )
