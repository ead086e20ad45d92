"""The outbox relay when the broker cannot be reached: its rows stay unsent and it retries, without stopping the worker.

The relay runs against a real PostgreSQL and a producer pointed at a
127.0.0.1 port where nothing listens.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer import db, migrations, outbox

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
