"""Key-level concurrency: order per key, bounded parallelism, and all-or-nothing batches under a crash."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import asyncpg
import pytest

from tests.concurrency import handlers
from tests.integration import helpers
from tests.support import kafka
from tests.support.process import WorkerProcess
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

KEYS = 6
PER_KEY = 4


def keyed_records(topic_round: str = "") -> list[kafka.Record]:
    """KEYS Kafka keys with PER_KEY messages each, interleaved: a0 b0 c0 ... a1 b1 ..."""
    records = []
    for index in range(PER_KEY):
        for key_index in range(KEYS):
            kafka_key = f"{chr(ord('a') + key_index)}{topic_round}"
            idempotency_key = f"{kafka_key}:{index}"
            records.append(
                kafka.Record(
                    partition=0,
                    key=kafka_key.encode(),
                    value=json.dumps({"order_id": idempotency_key, "amount": index}).encode(),
                    headers=[("Idempotency-Key", idempotency_key.encode())],
                )
            )
    return records


async def effects_in_commit_order(connection: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await connection.fetch('SELECT order_id, "offset" FROM test_app.effects ORDER BY seq')
    return rows


async def test_key_ordering_keeps_order_per_key(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: helpers.Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    await kafka.produce(kafka_bootstrap, topic, keyed_records())
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    handlers.KeyedSlowHandler.most_in_flight = 0

    async with helpers.running_worker(handlers.KeyedSlowHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: KEYS * PER_KEY}, timeout_s=30)

    effects = await effects_in_commit_order(rows.connection)
    assert len(effects) == KEYS * PER_KEY
    assert len({row["order_id"] for row in effects}) == KEYS * PER_KEY
    for key, offsets in handlers.effect_order(effects).items():
        assert offsets == sorted(offsets), key
        assert len(offsets) == PER_KEY, key
    # Calls of different keys overlapped, within the handler's limit.
    assert handlers.KeyedSlowHandler.most_in_flight > 1
    assert handlers.KeyedSlowHandler.most_in_flight <= handlers.KeyedSlowHandler.max_concurrency


async def test_unordered_mode_overlaps_same_key(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: helpers.Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    same_key = [
        kafka.Record(
            partition=0,
            key=b"one-key",
            value=json.dumps({"order_id": f"k:{index}", "amount": index}).encode(),
            headers=[("Idempotency-Key", f"k:{index}".encode())],
        )
        for index in range(6)
    ]
    await kafka.produce(kafka_bootstrap, topic, same_key)
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    handlers.UnorderedSlowHandler.most_in_flight = 0

    async with helpers.running_worker(handlers.UnorderedSlowHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 6}, timeout_s=30)

    assert len(await rows.effect_keys()) == 6
    # One Kafka key, yet calls overlapped: ordering "none" gives up key order.
    assert handlers.UnorderedSlowHandler.most_in_flight > 1


async def test_position_never_passes_unfinished_offset_on_crash(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: helpers.Rows,
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    """kill -9 while some calls of a concurrent batch finished and others still sleep: none or all apply."""
    topic = topic_factory()
    group_id = helpers.unique_group()
    await kafka.produce(kafka_bootstrap, topic, keyed_records())
    env = {
        "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CONSUMER_KAFKA__TOPICS": topic,
        "CONSUMER_KAFKA__GROUP_ID": group_id,
        "CONSUMER_KAFKA__SESSION_TIMEOUT_S": "6",
        "CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S": "1",
        "CONSUMER_POSTGRES__DSN": app_database,
        # One transaction for the whole set, with calls that take a while.
        "CONSUMER_WORKER__MAX_BATCH_SIZE": str(KEYS * PER_KEY),
        "CONSUMER_TEST_SLEEP_S": "1.5",
    }
    first = worker_factory("tests.concurrency.handlers:KeyedSlowHandler", env=env)

    async def some_calls_started() -> bool:
        started: int = await rows.connection.fetchval("SELECT count(*) FROM test_app.invocations")
        return started >= KEYS + 1

    # After KEYS + 1 calls, the first round of keys has finished its sleep
    # (out of offset order across keys) and the second round is in flight.
    await wait_for(some_calls_started, timeout_s=40, interval_s=0.05, description="calls in flight")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout_s=10)

    assert await rows.connection.fetchval("SELECT count(*) FROM test_app.effects") == 0
    positions = await rows.next_offsets(group_id, topic)
    assert positions in ({}, {0: 0})

    env["CONSUMER_TEST_SLEEP_S"] = "0.05"
    worker_factory("tests.concurrency.handlers:KeyedSlowHandler", env=env)
    await rows.wait_for_next_offsets(group_id, topic, {0: KEYS * PER_KEY}, timeout_s=40)

    effects = await effects_in_commit_order(rows.connection)
    assert len(effects) == KEYS * PER_KEY
    assert len({row["order_id"] for row in effects}) == KEYS * PER_KEY
    for key, offsets in handlers.effect_order(effects).items():
        assert offsets == sorted(offsets), key
