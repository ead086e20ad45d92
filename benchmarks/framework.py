"""The framework's worker, run in this process on a fresh group, timed from its first fetch.

The run ends when every partition's stored position (the ``positions``
table, polled every `POLL_S`) reaches the topic's end offset. The time from
`Worker.run` to the first fetch is the group join, left out of the rate.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
from pydantic import SecretStr

from benchmarks.database import SCHEMA
from benchmarks.drains import SESSION_TIMEOUT_MS
from benchmarks.stream import Topic
from consumer.handler import Handler
from consumer.settings import KafkaSettings, PostgresSettings, Settings, WorkerSettings
from consumer.worker import Worker

__all__ = ["FrameworkRun", "read_positions", "run_worker", "settings_for"]

POLL_S = 0.02
# The first fetch is noticed within this interval.
_FETCH_POLL_S = 0.002
RUN_TIMEOUT_S = 600.0


@dataclass
class FrameworkRun:
    """A worker's drain of one topic."""

    messages: int
    seconds: float
    join_s: float
    applied: int
    key_duplicates: int
    handler_calls: int
    batches: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def settings_for(bootstrap_servers: str, database_url: str, topic: str, group_id: str) -> Settings:
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=[bootstrap_servers],
            topics=[topic],
            group_id=group_id,
            session_timeout_s=SESSION_TIMEOUT_MS / 1000,
            heartbeat_interval_s=SESSION_TIMEOUT_MS / 3000,
        ),
        postgres=PostgresSettings(dsn=SecretStr(database_url), schema=SCHEMA, application_name="bench-worker"),
        worker=WorkerSettings(),
    )


async def read_positions(connection: asyncpg.Connection, dedup_scope: str) -> dict[int, int]:
    # SCHEMA is a constant of this package.
    rows = await connection.fetch(
        f"SELECT partition, next_offset FROM {SCHEMA}.positions WHERE dedup_scope = $1",  # noqa: S608
        dedup_scope,
    )
    return {row["partition"]: row["next_offset"] for row in rows}


def reached_end(positions: dict[int, int], topic: Topic) -> bool:
    return all(positions.get(partition, 0) >= end for partition, end in topic.end_offsets.items())


async def run_worker(
    handler: Handler[Any],
    bootstrap_servers: str,
    database_url: str,
    topic: Topic,
    *,
    on_fetch: Callable[[], None] | None = None,
) -> FrameworkRun:
    """Drain `topic` with an in-process `Worker` running `handler`; `on_fetch` runs at its first fetch."""
    group_id = f"bench-{uuid.uuid4().hex[:12]}"
    worker = Worker(handler, settings_for(bootstrap_servers, database_url, topic.name, group_id))
    observer = await asyncpg.connect(database_url)
    result: FrameworkRun | None = None
    try:
        async with anyio.create_task_group() as task_group:
            launched = time.monotonic()
            task_group.start_soon(worker.run)
            with anyio.fail_after(RUN_TIMEOUT_S):
                # Polling, because the worker has no event for its first fetch.
                while worker.stats.fetched == 0:  # noqa: ASYNC110
                    await anyio.sleep(_FETCH_POLL_S)
                started = time.monotonic()
                if on_fetch is not None:
                    on_fetch()
                while not reached_end(await read_positions(observer, worker.dedup_scope), topic):  # noqa: ASYNC110
                    await anyio.sleep(POLL_S)
            finished = time.monotonic()
            stats = worker.stats
            result = FrameworkRun(
                messages=topic.messages,
                seconds=finished - started,
                join_s=started - launched,
                applied=stats.applied,
                key_duplicates=stats.key_duplicates,
                handler_calls=stats.handler_calls,
                batches=stats.batches,
            )
            worker.stop()
    finally:
        await observer.close()
    assert result is not None
    return result
