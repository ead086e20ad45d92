"""The same idempotency key on two partitions at once, applied by two workers of one group.

The first transaction to insert the key's inbox row keeps it locked until
it ends, and the other transaction's insert waits on that row. These tests pin that the
waiting side neither applies the key a second time (when the first commits)
nor loses it (when the first rolls back).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from consumer.worker import Worker
from tests.integration import helpers
from tests.integration.helpers import Rows, order_record
from tests.support import handlers
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

HANDLER_SLEEP_S = 2.0
ROUNDS = 5


@asynccontextmanager
async def two_workers(
    kafka_bootstrap: str, database_url: str, topic: str, group_id: str
) -> AsyncIterator[list[Worker]]:
    """Run two workers of `group_id` on the two partitions of `topic` until each owns one."""
    config = helpers.worker_settings(kafka_bootstrap, database_url, topic, group_id)
    async with AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(helpers.running_worker(handlers.OrderHandler(), config, partitions=0))
            for _ in range(2)
        ]

        async def one_each() -> bool:
            return all(len(worker.health()["assigned"]) == 1 for worker in workers)

        await wait_for(one_each, timeout_s=45, description="each worker to own one partition")
        yield workers


async def produce_on_both_partitions(kafka_bootstrap: str, topic: str, key: str) -> None:
    spread_s = await helpers.produce_at_once(
        kafka_bootstrap, topic, [order_record(key, partition=0), order_record(key, partition=1)]
    )
    assert spread_s < 0.05, f"the two copies of {key} were produced {spread_s:.3f} s apart"


async def test_concurrent_copies_of_key_applied_once(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory(2)
    group_id = helpers.unique_group()
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"race": {"sleep_before_s": HANDLER_SLEEP_S}}))

    async with two_workers(kafka_bootstrap, app_database, topic, group_id) as workers:
        await produce_on_both_partitions(kafka_bootstrap, topic, "race")
        await rows.wait_for_next_offsets(group_id, topic, {0: 1, 1: 1})
    positions = await rows.positions(group_id, topic)

    assert await rows.effect_keys() == ["race"]
    assert await rows.inbox_keys(group_id) == ["race"]
    assert await rows.invocations("race") == 1
    assert await rows.dead_letters() == []
    assert sorted(row["key_duplicates"] for row in positions.values()) == [0, 1]
    assert sorted(row["applied"] for row in positions.values()) == [0, 1]
    assert [worker.stats.retries for worker in workers] == [0, 0]
    assert [worker.stats.infrastructure_retries for worker in workers] == [0, 0]


async def test_copy_waiting_on_rolled_back_claim_applied_once(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first claimant sleeps and fails once, the waiting copy takes the claim, and one effect results."""
    topic = topic_factory(2)
    group_id = helpers.unique_group()
    keys = [f"race-{round_number}" for round_number in range(ROUNDS)]
    hook = {"sleep_before_s": HANDLER_SLEEP_S, "sleep_first_call_only": True, "raise": "ValueError", "times": 1}
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({key: hook for key in keys}))

    async with two_workers(kafka_bootstrap, app_database, topic, group_id):
        for round_number, key in enumerate(keys):
            started = time.monotonic()
            await produce_on_both_partitions(kafka_bootstrap, topic, key)
            await rows.wait_for_next_offsets(group_id, topic, {0: round_number + 1, 1: round_number + 1})
            elapsed_s = time.monotonic() - started

            assert len(await rows.effects(key)) == 1, key
            assert await rows.invocations(key) == 2, key
            assert elapsed_s < 10.0, f"{key} took {elapsed_s:.1f} s"
    positions = await rows.positions(group_id, topic)

    assert sorted(await rows.effect_keys()) == keys
    assert await rows.inbox_keys(group_id) == keys
    assert await rows.dead_letters() == []
    assert sum(row["key_duplicates"] for row in positions.values()) == ROUNDS
    assert sum(row["applied"] for row in positions.values()) == ROUNDS
