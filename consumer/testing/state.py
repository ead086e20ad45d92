"""Reads the framework's tables of one dedup scope, and asserts that a message took effect once.

Every method opens a short connection of its own, so an `InboxState` is not
tied to an event loop and needs no closing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import asyncpg

from consumer import db
from consumer.handler import Handler, build_message
from consumer.message import RawMessage

__all__ = ["EffectCount", "InboxState", "idempotency_key_of"]

# A SQL query returning a count, with the idempotency key as $1, or a
# coroutine function computing the count from a connection and the key.
EffectCount = str | Callable[[asyncpg.Connection, str], Awaitable[int]]

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@functools.cache
def load_queries(schema: str) -> db.Queries:
    """Parse the kit's ``queries.sql`` for `schema`, in the format of the framework's query files."""
    text = resources.files("consumer.testing").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME_LINE.split(text)
    texts = {
        name: body.strip().replace("{schema}", schema) for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }
    return db.Queries(texts)


def idempotency_key_of(handler: Handler[Any], raw: RawMessage) -> str | None:
    """Return the key `handler` deduplicates `raw` on, or None when the record cannot be decoded."""
    try:
        return build_message(handler, raw).idempotency_key
    except Exception:
        # Bad input, or a bug in the handler's decode or key function, leaves
        # the record without a key; its dead letter shows the error instead.
        return None


class InboxState:
    """The positions, dedup records, dead letters and outbox rows of one dedup scope in one database."""

    def __init__(self, dsn: str, dedup_scope: str, *, schema: str = "consumer") -> None:
        self.dsn = dsn
        self.dedup_scope = dedup_scope
        self.schema = schema
        self.queries = load_queries(schema)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run `query` on a connection of its own and return its rows."""
        connection = await asyncpg.connect(self.dsn)
        try:
            rows: list[asyncpg.Record] = await connection.fetch(query, *args)
            return rows
        finally:
            await connection.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        """Run `query` on a connection of its own and return the first column of its first row."""
        connection = await asyncpg.connect(self.dsn)
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    async def positions(self) -> dict[tuple[str, int], int]:
        """Return the stored next offset of each (topic, partition) of the scope."""
        rows = await self.fetch(self.queries.positions, self.dedup_scope)
        return {(row["topic"], row["partition"]): row["next_offset"] for row in rows}

    async def dedup_records(self, key: str) -> list[asyncpg.Record]:
        """Return the dedup records of `key`: none, or one."""
        return await self.fetch(self.queries.dedup_records, self.dedup_scope, key)

    async def dead_letters(self) -> list[asyncpg.Record]:
        """Return the scope's dead letters, parked ones included, by position."""
        return await self.fetch(self.queries.dead_letters, self.dedup_scope)

    async def outbox(self) -> list[asyncpg.Record]:
        """Return the messages handlers published through the outbox, in publish order."""
        return await self.fetch(self.queries.outbox, self.dedup_scope)

    async def step_results(self) -> list[asyncpg.Record]:
        """Return the stored results of ``context.step`` calls."""
        return await self.fetch(self.queries.step_results, self.dedup_scope)

    async def count_effects(self, effects: EffectCount, key: str) -> int:
        """Return the effect count of `key`, from a SQL query (key as $1) or a coroutine function."""
        connection = await asyncpg.connect(self.dsn)
        try:
            if isinstance(effects, str):
                return int(await connection.fetchval(effects, key))
            return int(await effects(connection, key))
        finally:
            await connection.close()

    async def assert_applied_once(
        self,
        key: str,
        *,
        keyed: bool = True,
        messages: Iterable[RawMessage] = (),
        effects: EffectCount | None = None,
        expected_effects: int = 1,
    ) -> None:
        """Assert that the message with idempotency key `key` was applied, once.

        Checks that the key has one dedup record marked applied (for keyed
        messages), that no dead letter of the scope carries the key, and that
        the stored position is past each of `messages`. With `effects`, the
        handler's own count of effects for the key must equal
        `expected_effects`.
        """
        if keyed:
            records = await self.dedup_records(key)
            assert records, (
                f"idempotency key {key!r} has no dedup record in scope {self.dedup_scope!r}: "
                "the message was never applied, or its transaction rolled back"
            )
            assert records[0]["status"] == "applied", (
                f"idempotency key {key!r} was {records[0]['status']}, not applied; "
                "see the dead letters for the handler's error"
            )
        dead = [row for row in await self.dead_letters() if row["idempotency_key"] == key]
        assert not dead, f"idempotency key {key!r} has dead letters: {_describe_dead_letters(dead)}"
        await self._assert_positions_past(messages)
        if effects is not None:
            count = await self.count_effects(effects, key)
            assert count == expected_effects, (
                f"idempotency key {key!r} has {count} effect(s), expected {expected_effects}: "
                "the handler's effects were applied more or less often than the message"
            )

    async def _assert_positions_past(self, messages: Iterable[RawMessage]) -> None:
        positions = await self.positions()
        for raw in messages:
            stored = positions.get((raw.topic, raw.partition))
            assert stored is not None, f"{raw.topic}-{raw.partition} has no stored position in {self.dedup_scope!r}"
            assert stored > raw.offset, (
                f"the stored position of {raw.topic}-{raw.partition} is {stored}, "
                f"not past offset {raw.offset}: the message is not settled yet"
            )


def _describe_dead_letters(rows: Iterable[Mapping[str, Any]]) -> str:
    return "; ".join(
        f"offset {row['offset']}: {row['status']} ({row['reason']}) after {row['attempts']} attempt(s): "
        f"{row['last_error_type']}: {row['last_error']}"
        for row in rows
    )
