"""A replay while workers run: they follow the moved position without a restart and apply nothing twice.

The workers run in the test process, so the test can read their metrics.
"""

from __future__ import annotations

import logging

import pytest

from consumer.worker import Worker
from tests.integration import helpers as integration
from tests.replay.conftest import StackFactory
from tests.replay.handlers import InProcessOrderHandler
from tests.replay.helpers import order_record, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PER_PARTITION = 8


def _duplicates_skipped(worker: Worker, topic: str, cause: str) -> float:
    labels = {"group": worker.group_id, "topic": topic, "cause": cause}
    return worker.metrics.registry.get_sample_value("consumer_duplicates_skipped_total", labels) or 0.0


def _assigned(worker: Worker) -> int:
    return len(worker.health()["assigned"])


async def test_replay_while_workers_run(
    make_stack: StackFactory,
    kafka_bootstrap: str,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumer.processor")
    stack, rows = await make_stack(2)
    # Per partition: six keyed orders and two without an Idempotency-Key
    # header, which are deduplicated by position only.
    records = [
        order_record(f"k-{partition}-{n}", partition=partition, keyed=n % 4 != 3)
        for partition in (0, 1)
        for n in range(PER_PARTITION)
    ]
    await stack.produce(records)
    config = integration.worker_settings(kafka_bootstrap, database_url, stack.topic, stack.group_id)

    async with (
        integration.running_worker(InProcessOrderHandler(), config, partitions=2) as first,
        integration.running_worker(InProcessOrderHandler(), config, partitions=1) as second,
    ):
        await wait_until(
            lambda: _both_own_one(first, second), timeout_s=30, description="each worker to own one partition"
        )
        await rows.wait_for_next_offsets({0: PER_PARTITION, 1: PER_PARTITION})
        before = await rows.positions()
        rebalances = first.stats.rebalances + second.stats.rebalances

        result = await stack.replay("--to-earliest", "--yes")
        assert result.exit_code == 0, result.stderr
        moved = await rows.positions()
        for partition in (0, 1):
            assert moved[partition]["epoch"] == before[partition]["epoch"] + 1
            assert moved[partition]["high_water"] == PER_PARTITION

        # One new order per partition makes each worker run a transaction,
        # which finds the new epoch.
        await stack.produce([order_record(f"new-{partition}", partition=partition) for partition in (0, 1)])
        await rows.wait_for_next_offsets({0: PER_PARTITION + 1, 1: PER_PARTITION + 1})

        workers = (first, second)
        replay_skips = sum(_duplicates_skipped(worker, stack.topic, "replay") for worker in workers)
        assert first.stats.rebalances + second.stats.rebalances == rebalances, "no worker restarted or rejoined"

    effects = await rows.effects_per_key()
    assert len(effects) == 2 * PER_PARTITION + 2
    assert set(effects.values()) == {1}
    assert replay_skips == 2 * PER_PARTITION
    after = await rows.positions()
    for partition in (0, 1):
        assert after[partition]["epoch"] == before[partition]["epoch"] + 1
        assert after[partition]["high_water"] == PER_PARTITION + 1
    followed = [record for record in caplog.records if getattr(record, "action", None) == "replay_followed"]
    assert sorted((record.partition, record.offset) for record in followed) == [(0, 0), (1, 0)]  # type: ignore[attr-defined]


async def _both_own_one(first: Worker, second: Worker) -> bool:
    return _assigned(first) == 1 and _assigned(second) == 1
