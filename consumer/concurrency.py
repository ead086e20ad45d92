"""Key-level concurrency inside one partition's batch.

With ``ordering = "key"`` a batch's messages are grouped by Kafka key: the
groups run concurrently, the messages of one group in offset order. With
``ordering = "none"`` every message runs concurrently. At most
``max_concurrency`` handler calls of one partition run at once.

All calls share the batch transaction. Their statements go through a
`SerializedConnection`, which runs one statement at a time on the
connection, so what overlaps is the time handlers spend awaiting something
else (an HTTP call, a model). The batch still commits or rolls back as a
whole, so the stored position never passes a message that did not finish,
and a crash with some calls done and others not applies none of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import asyncpg

__all__ = ["SerializedConnection", "group_by_key", "run_groups"]

ItemT = TypeVar("ItemT")


class SerializedConnection:
    """A connection shared by concurrent handler calls: statements run one at a time.

    It offers the query methods of `asyncpg.Connection`. Transactions are
    the framework's: calling `transaction` raises.
    """

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection
        self._lock = anyio.Lock()

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        async with self._lock:
            result: str = await self._connection.execute(query, *args, timeout=timeout)
            return result

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        async with self._lock:
            await self._connection.executemany(command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:
        async with self._lock:
            rows: list[asyncpg.Record] = await self._connection.fetch(query, *args, timeout=timeout)
            return rows

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> asyncpg.Record | None:
        async with self._lock:
            row: asyncpg.Record | None = await self._connection.fetchrow(query, *args, timeout=timeout)
            return row

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        async with self._lock:
            return await self._connection.fetchval(query, *args, column=column, timeout=timeout)

    def is_closed(self) -> bool:
        closed: bool = self._connection.is_closed()
        return closed

    def transaction(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("handlers run inside the framework's transaction; do not open another one")


def group_by_key(items: Sequence[ItemT], key_of: Callable[[ItemT], bytes | None], *, by_key: bool) -> list[list[ItemT]]:
    """Split `items` into groups that may run concurrently, keeping offset order inside a group.

    Messages without a Kafka key form one group of their own each, since
    nothing orders them against each other.
    """
    if not by_key:
        return [[item] for item in items]
    groups: dict[bytes, list[ItemT]] = {}
    result: list[list[ItemT]] = []
    for item in items:
        key = key_of(item)
        if key is None:
            result.append([item])
            continue
        group = groups.get(key)
        if group is None:
            group = groups[key] = []
            result.append(group)
        group.append(item)
    return result


async def run_groups(
    groups: list[list[ItemT]], run_one: Callable[[ItemT], Awaitable[None]], max_concurrency: int
) -> None:
    """Run each group's items in order, groups concurrently, at most `max_concurrency` calls at a time.

    The first exception cancels the other calls and is raised as it is (not
    wrapped in an exception group).
    """
    limiter = anyio.CapacityLimiter(max_concurrency)
    failures: list[BaseException] = []

    async def run_group(group: list[ItemT], cancel_scope: anyio.CancelScope) -> None:
        for item in group:
            async with limiter:
                try:
                    await run_one(item)
                except Exception as exc:
                    failures.append(exc)
                    cancel_scope.cancel()
                    return

    async with anyio.create_task_group() as task_group:
        for group in groups:
            task_group.start_soon(run_group, group, task_group.cancel_scope)
    if failures:
        raise failures[0]
