"""Worker shutdown: what reaches Kafka's committed offsets when a worker stops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator

from tests.integration import helpers
from tests.integration.helpers import Rows, order_record
from tests.support import handlers, kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

COMMIT_DELAY_S = 0.5


async def test_stop_during_mirror_commit_mirrors_final_position(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop that lands while the periodic Kafka commit is in flight still leaves Kafka at the stored position."""
    # NOTE: this slows every OffsetCommit of the process by COMMIT_DELAY_S,
    # through a private method of aiokafka 0.14, to stand in for a slow broker:
    # it makes the stop land inside the mirror loop's commit every time.
    original = GroupCoordinator._do_commit_offsets

    async def slow_commit(self: GroupCoordinator, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(COMMIT_DELAY_S)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(GroupCoordinator, "_do_commit_offsets", slow_commit)
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(
        kafka_bootstrap, app_database, topic, group_id, worker={"kafka_commit_interval_s": 0.2}
    )
    await kafka.produce(kafka_bootstrap, topic, [order_record(f"k-{index}") for index in range(3)])

    async with helpers.running_worker(handlers.OrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
        # The mirror loop wakes within 0.2 s of the batch commit and then
        # spends COMMIT_DELAY_S in its Kafka commit.
        await anyio.sleep(0.3)
    committed = await kafka.fetch_committed(kafka_bootstrap, group_id, topic, [0])

    assert committed == {0: 3}
