"""Redrive: apply dead-lettered messages again with the handler deployed now.

Each dead letter is redriven in a transaction of its own that locks its row,
so two redrives running at once (or one run twice) apply it once: the second
finds it resolved. The message goes through the same idempotency key claim
as in the worker; if another copy of the key was applied since, the dead
letter is resolved without calling the handler.

Parked keys are redriven as a unit: the key's row in ``parked_keys`` is
locked, its parked messages are applied in offset order, and the key is
released only when all of them succeeded. The worker reads that row with a
share lock, so it cannot park a new message for the key while this runs.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from consumer import dead_letters, errors
from consumer.deferred import DeferredWrites
from consumer.handler import Context, Handler, build_message, load_handler

__all__ = ["RedriveResult", "redrive"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RedriveResult:
    """Counts of one redrive run, and the errors of the dead letters that failed again."""

    resolved: list[int] = field(default_factory=list)
    already_applied: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


HandlerLoader = Callable[[str], Handler[Any]]


def _default_loader() -> HandlerLoader:
    cache: dict[str, Handler[Any]] = {}

    def load(path: str) -> Handler[Any]:
        if path not in cache:
            cache[path] = load_handler(path)()
        return cache[path]

    return load


async def redrive(
    connection: asyncpg.Connection,
    queries: Any,
    ids: list[int],
    *,
    handler_override: str | None = None,
    loader: HandlerLoader | None = None,
) -> RedriveResult:
    """Redrive the dead letters `ids`, in id order; parked ones with the rest of their key."""
    load = loader or _default_loader()
    result = RedriveResult()
    done_keys: set[tuple[str, str, bytes]] = set()
    for dead_letter_id in sorted(ids):
        if dead_letter_id in result.resolved or dead_letter_id in result.failed:
            continue
        row = await connection.fetchrow(queries.select_columns + " WHERE id = $1", dead_letter_id)
        if row is None:
            result.skipped.append(dead_letter_id)
            continue
        handler = load(handler_override or row["handler"])
        if row["status"] == dead_letters.STATUS_PARKED and row["key"] is not None:
            key = (row["dedup_scope"], row["topic"], bytes(row["key"]))
            if key not in done_keys:
                done_keys.add(key)
                await _redrive_parked_key(connection, queries, handler, key, result)
            continue
        await _redrive_one(connection, queries, handler, dead_letter_id, result)
    # A parked letter another redrive resolved first, while this one waited
    # for its key, is reported as skipped rather than left out.
    reported = set(result.resolved) | set(result.already_applied) | set(result.skipped) | set(result.failed)
    result.skipped.extend(sorted(set(ids) - reported))
    return result


async def _redrive_one(
    connection: asyncpg.Connection, queries: Any, handler: Handler[Any], dead_letter_id: int, result: RedriveResult
) -> None:
    async with connection.transaction():
        row = await connection.fetchrow(queries.lock_dead_letter, dead_letter_id)
        if row is None or row["status"] != dead_letters.STATUS_DEAD:
            result.skipped.append(dead_letter_id)
            return
        await _apply(connection, queries, handler, row, result)


async def _redrive_parked_key(
    connection: asyncpg.Connection,
    queries: Any,
    handler: Handler[Any],
    key: tuple[str, str, bytes],
    result: RedriveResult,
) -> None:
    """Apply a parked key's messages in offset order; release the key when all succeeded."""
    async with connection.transaction():
        locked = await connection.fetchrow(queries.lock_parked_key, *key)
        rows = await connection.fetch(queries.parked_letters_of_key, *key)
        for row in rows:
            if not await _apply(connection, queries, handler, row, result):
                # Later messages of the key stay parked behind the one that failed again.
                return
        if locked is not None:
            await connection.execute(queries.unpark_key, *key)
            logger.info(
                "parked key released after %d message(s)",
                len(rows),
                extra={"action": "key_unparked", "topic": key[1], "dedup_scope": key[0]},
            )


async def _apply(
    connection: asyncpg.Connection, queries: Any, handler: Handler[Any], row: asyncpg.Record, result: RedriveResult
) -> bool:
    """Run the handler for one locked dead letter in a savepoint; record the outcome; return success."""
    dead_letter_id = row["id"]
    raw = dead_letters.raw_message(row)
    try:
        async with connection.transaction():
            message = build_message(handler, raw)
            if message.keyed:
                claimed = await connection.fetchval(
                    queries.claim_for_redrive,
                    row["dedup_scope"],
                    message.idempotency_key,
                    raw.topic,
                    raw.partition,
                    raw.offset,
                    handler.fingerprint(message),
                )
                if claimed is None:
                    await connection.execute(queries.mark_resolved, dead_letter_id)
                    result.already_applied.append(dead_letter_id)
                    return True
            deferred = DeferredWrites()
            context = Context(
                connection=connection,
                group_id=row["group_id"],
                dedup_scope=row["dedup_scope"],
                attempt=1,
                logger=logging.getLogger(type(handler).__module__),
                deferred=deferred,
            )
            await handler.handle(message, context)
            await deferred.flush(connection)
    except (errors.InfrastructureError, asyncpg.PostgresConnectionError, ConnectionError):
        raise
    except Exception as exc:
        text = "".join(traceback.format_exception(exc))[-8000:]
        await connection.execute(queries.mark_redrive_failed, dead_letter_id, type(exc).__name__, str(exc), text)
        result.failed[dead_letter_id] = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "redrive of dead letter %d failed: %s: %s",
            dead_letter_id,
            type(exc).__name__,
            exc,
            extra={"action": "redrive_failed", "topic": raw.topic, "partition": raw.partition, "offset": raw.offset},
        )
        return False
    await connection.execute(queries.mark_resolved, dead_letter_id)
    result.resolved.append(dead_letter_id)
    logger.info(
        "dead letter %d redriven",
        dead_letter_id,
        extra={"action": "dead_letter_redriven", "topic": raw.topic, "partition": raw.partition, "offset": raw.offset},
    )
    return True
