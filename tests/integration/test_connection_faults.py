"""A PostgreSQL connection lost, or a handler timed out, while a batch transaction is open.

The handler writes its effect and then sleeps with the transaction open. A
separate connection kills that backend (or the handler timeout cancels the
call). The batch must roll back as a whole and be applied again: one effect
per key, no dead letter, no transaction left open, and Kafka's committed
offset never ahead of the stored position.
"""

from __future__ import annotations

import datetime

import time
from collections.abc import Callable

import anyio
import asyncpg
import pytest

from tests.integration import helpers
from tests.integration.helpers import Rows, order_record
from tests.support import handlers, kafka
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

POOL_SIZE = 2
ROUNDS = 5
KEYS_PER_ROUND = 6
# The handler of the fourth key keeps its transaction open this long on its first call.
SLEEP_S = 3.0

SELECT_BACKENDS = """
SELECT pid, state, now() - state_change AS idle_for FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
"""
# Every batch transaction is idle for a moment between two statements; only
# the hooked handler's sleep keeps one idle this long.
HELD_OPEN = datetime.timedelta(seconds=1)


def round_keys(round_number: int) -> list[str]:
    return [f"r{round_number}-k-{index}" for index in range(KEYS_PER_ROUND)]


async def backends(connection: asyncpg.Connection, application_name: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await connection.fetch(SELECT_BACKENDS, application_name)
    return rows


async def idle_in_transaction(connection: asyncpg.Connection, application_name: str) -> list[int]:
    return [row["pid"] for row in await backends(connection, application_name) if row["state"] == "idle in transaction"]


async def held_open(connection: asyncpg.Connection, application_name: str) -> list[int]:
    """Return backends idle in a transaction for longer than a statement gap: the hooked handler's sleep."""
    rows = await backends(connection, application_name)
    return [row["pid"] for row in rows if row["state"] == "idle in transaction" and row["idle_for"] > HELD_OPEN]


async def wait_for_kafka_offset(bootstrap: str, group_id: str, topic: str, offset: int) -> None:
    async def caught_up() -> bool:
        return (await kafka.fetch_committed(bootstrap, group_id, topic, [0]))[0] == offset

    await wait_for(caught_up, timeout_s=15, description=f"Kafka committed offset {offset}")


class OffsetSampler:
    """Samples Kafka's committed offset and then the stored position of partition 0, again and again.

    Reading Kafka first means a sample can only show Kafka ahead if Kafka
    really was ahead of PostgreSQL at that moment, because the stored
    position never moves backwards.
    """

    def __init__(self, bootstrap: str, database_url: str, group_id: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.group_id = group_id
        self.topic = topic
        self.samples: list[tuple[int | None, int | None]] = []

    async def run(self) -> None:
        connection = await asyncpg.connect(self.database_url)
        try:
            rows = Rows(connection)
            while True:
                committed = (await kafka.fetch_committed(self.bootstrap, self.group_id, self.topic, [0]))[0]
                stored = (await rows.next_offsets(self.group_id, self.topic)).get(0)
                self.samples.append((committed, stored))
                await anyio.sleep(0.1)
        finally:
            with anyio.CancelScope(shield=True):
                await connection.close()

    def ahead(self) -> list[tuple[int | None, int | None]]:
        """Return the samples where Kafka's committed offset was above the stored position."""
        return [
            (committed, stored)
            for committed, stored in self.samples
            if committed is not None and (stored is None or committed > stored)
        ]


async def test_killed_backend_mid_transaction_rolls_back_and_reapplies(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    application_name = group_id
    config = helpers.worker_settings(
        kafka_bootstrap,
        app_database,
        topic,
        group_id,
        worker={"kafka_commit_interval_s": 0.2},
        postgres={"pool_min_size": POOL_SIZE, "pool_max_size": POOL_SIZE, "application_name": application_name},
    )
    hook = {"sleep_after_effect_s": SLEEP_S, "sleep_first_call_only": True}
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({round_keys(n)[3]: hook for n in range(ROUNDS)}))
    sampler = OffsetSampler(kafka_bootstrap, app_database, group_id, topic)
    killed: list[int] = []
    max_backends = 0

    async with helpers.running_worker(handlers.OrderHandler(), config), anyio.create_task_group() as sampling:
        sampling.start_soon(sampler.run)
        for round_number in range(ROUNDS):
            keys = round_keys(round_number)
            await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in keys])

            async def open_transaction() -> list[int]:
                return await held_open(rows.connection, application_name)

            pids = await wait_for(open_transaction, timeout_s=15, interval_s=0.05, description="an open transaction")
            max_backends = max(max_backends, len(await backends(rows.connection, application_name)))
            assert await rows.connection.fetchval("SELECT pg_terminate_backend($1)", pids[0])
            killed.append(pids[0])
            await rows.wait_for_next_offsets(group_id, topic, {0: (round_number + 1) * KEYS_PER_ROUND})
            max_backends = max(max_backends, len(await backends(rows.connection, application_name)))

            assert await rows.invocations(keys[3]) == 2, keys[3]
            for key in keys:
                assert len(await rows.effects(key)) == 1, key

        # Waiting for Kafka to catch up also lets the periodic mirror finish
        # before the worker stops.
        await wait_for_kafka_offset(kafka_bootstrap, group_id, topic, ROUNDS * KEYS_PER_ROUND)
        killed_at = time.monotonic()
        await anyio.sleep(5.0)
        left_open = await idle_in_transaction(rows.connection, application_name)
        max_backends = max(max_backends, len(await backends(rows.connection, application_name)))
        sampling.cancel_scope.cancel()

    assert len(killed) == ROUNDS
    assert time.monotonic() - killed_at >= 5.0
    assert left_open == []
    assert max_backends <= POOL_SIZE
    assert len(await rows.effect_keys()) == ROUNDS * KEYS_PER_ROUND
    assert await rows.dead_letters() == []
    assert len(sampler.samples) > 10
    assert sampler.ahead() == []


async def test_handler_timeout_rolls_back_effect_and_retries(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(
        kafka_bootstrap,
        app_database,
        topic,
        group_id,
        worker={"handler_timeout_s": 1.0, "kafka_commit_interval_s": 0.2},
        postgres={"pool_min_size": POOL_SIZE, "pool_max_size": POOL_SIZE, "application_name": group_id},
    )
    keys = round_keys(0)
    monkeypatch.setenv(
        helpers.HOOKS_VAR,
        helpers.hooks_json({keys[3]: {"sleep_after_effect_s": SLEEP_S, "sleep_first_call_only": True}}),
    )
    sampler = OffsetSampler(kafka_bootstrap, app_database, group_id, topic)

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker, anyio.create_task_group() as sampling:
        sampling.start_soon(sampler.run)
        await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in keys])
        await rows.wait_for_next_offsets(group_id, topic, {0: KEYS_PER_ROUND})
        left_open = await idle_in_transaction(rows.connection, group_id)
        await wait_for_kafka_offset(kafka_bootstrap, group_id, topic, KEYS_PER_ROUND)
        sampling.cancel_scope.cancel()

    assert await rows.invocations(keys[3]) == 2
    # The first call's effect was written inside the timed-out call and rolled back with it.
    assert len(await rows.effects(keys[3])) == 1
    assert await rows.effect_keys() == keys
    assert await rows.dead_letters() == []
    assert left_open == []
    assert worker.stats.retries == 1
    assert len(sampler.samples) > 3
    assert sampler.ahead() == []
