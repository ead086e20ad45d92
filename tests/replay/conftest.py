"""Fixtures of the replay tests: a migrated database, a fresh topic and group, and a reader of their rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from tests.replay.helpers import ORDER_HANDLER, Rows, Stack
from tests.support.process import WorkerProcess

StackFactory = Callable[..., Awaitable[tuple[Stack, Rows]]]


@pytest.fixture
async def make_stack(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    database_url: str,
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> AsyncIterator[StackFactory]:
    """Callable ``(partitions=1, *, handler=ORDER_HANDLER) -> (stack, rows)`` over a migrated database."""
    connections: list[asyncpg.Connection] = []

    async def make(partitions: int = 1, *, handler: str = ORDER_HANDLER) -> tuple[Stack, Rows]:
        stack = Stack(
            bootstrap=kafka_bootstrap,
            topic=topic_factory(partitions, prefix="replay"),
            database_url=database_url,
            log_dir=tmp_path,
            start_process=worker_factory,
            handler=handler,
        )
        await stack.migrate()
        connection = await asyncpg.connect(database_url)
        connections.append(connection)
        return stack, Rows(connection, stack)

    yield make
    for connection in connections:
        await connection.close()
