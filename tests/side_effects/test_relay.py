"""The outbox relay when it cannot send at once: an unreachable broker, or another relay holding the lock.

Each relay runs in the test process against a real PostgreSQL. Its
producer points at the test broker, or at a 127.0.0.1 port where nothing
listens.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer import db, migrations, outbox
from tests.side_effects.helpers import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SCOPE = "relay-test"


def _closed_port() -> int:
    """Return a 127.0.0.1 port that was free a moment ago, so a connection to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    connection = await asyncpg.connect(database_url)
    try:
        framework = migrations.discover(migrations.framework_migrations_dir())
        await migrations.migrate(connection, "consumer", migrations.FRAMEWORK_NAMESPACE, framework)
    finally:
        await connection.close()
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as opened:
        yield opened


async def test_relay_without_broker_keeps_rows_unsent(pool: asyncpg.Pool) -> None:
    queries = db.load_queries("side_effects.sql", "consumer")
    await pool.execute(queries.insert_outbox, SCOPE, "lead.scored", b"lead-1", b"{}", ["Idempotency-Key"], [b"k"])
    bootstrap = f"127.0.0.1:{_closed_port()}"
    relay = outbox.Relay(
        pool, queries, SCOPE, lambda: AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    )

    try:
        sent = await relay.send_batch()
    finally:
        await relay.close()

    assert sent == 0, "an unreachable broker is a transient failure: send_batch must return 0 and retry later"
    rows = await pool.fetch("SELECT sent_at FROM consumer.outbox WHERE dedup_scope = $1", SCOPE)
    assert [row["sent_at"] for row in rows] == [None]


async def test_relay_retries_after_lock_released(pool: asyncpg.Pool, kafka_bootstrap: str, topic_factory: Any) -> None:
    topic = topic_factory(1, prefix="relay")
    queries = db.load_queries("side_effects.sql", "consumer")
    relay = outbox.Relay(
        pool, queries, SCOPE, lambda: AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    )
    # Another worker's relay of the same dedup scope, sending a batch of its own.
    other_relay = await pool.acquire()
    try:
        await other_relay.execute("SELECT pg_advisory_lock(hashtext('consumer.outbox:' || $1))", SCOPE)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(relay.run)
            await pool.execute(queries.insert_outbox, SCOPE, topic, b"lead-1", b"{}", ["Idempotency-Key"], [b"k"])
            # What the worker does after a batch that published commits.
            relay.notify()
            await anyio.sleep(1.0)
            await other_relay.execute("SELECT pg_advisory_unlock(hashtext('consumer.outbox:' || $1))", SCOPE)

            async def row_sent() -> bool:
                sent_at = await pool.fetchval("SELECT sent_at FROM consumer.outbox WHERE dedup_scope = $1", SCOPE)
                return sent_at is not None

            try:
                await wait_until(
                    row_sent, timeout_s=15, description="the relay to send the row once the other relay let go"
                )
            finally:
                task_group.cancel_scope.cancel()
    finally:
        await pool.release(other_relay)
