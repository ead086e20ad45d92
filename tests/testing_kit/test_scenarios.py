"""The WorkerScenario fault helpers against a real broker and real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from consumer.testing import Record, WorkerScenario
from tests.testing_kit.handlers import COUNT_ENTRIES, LedgerHandler

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ScenarioFactory = Callable[..., WorkerScenario]


def orders(count: int, partitions: int = 1) -> list[Record]:
    return [
        Record({"order_id": f"o-{index}", "amount": index}, key=f"o-{index}", partition=index % partitions)
        for index in range(count)
    ]


async def test_crash_after_commit_applies_once(consumer_scenario: ScenarioFactory) -> None:
    scenario = consumer_scenario(LedgerHandler, partitions=2)
    produced = await scenario.produce(*orders(6, partitions=2))

    report = await scenario.crash_after_commit()

    assert report.stored == {0: 3, 1: 3}
    assert report.kafka_committed == {0: None, 1: None}
    assert report.crashed.applied == 6
    assert report.restarted.applied == 0
    for record in produced:
        await scenario.assert_applied_once(record, effects=COUNT_ENTRIES)


async def test_two_deployments_apply_once(consumer_scenario: ScenarioFactory) -> None:
    scenario = consumer_scenario(LedgerHandler)

    first, second = await scenario.run_two_deployments(*orders(8))

    assert first.applied + second.applied == 8
    assert first.fetched == 8
    assert second.fetched == 8
    for index in range(8):
        await scenario.assert_applied_once(f"o-{index}", effects=COUNT_ENTRIES)


async def test_replay_from_earliest_applies_nothing(consumer_scenario: ScenarioFactory) -> None:
    scenario = consumer_scenario(LedgerHandler)
    produced = await scenario.produce(*orders(5))
    async with scenario.run_worker() as worker:
        await scenario.wait_until_settled(worker)

    plans = await scenario.replay_from_earliest()

    assert [(plan.target, plan.would_apply, plan.position_duplicates) for plan in plans] == [(0, 0, 5)]
    assert await scenario.state.positions() == {(scenario.topic, 0): 5}
    for record in produced:
        await scenario.assert_applied_once(record, effects=COUNT_ENTRIES)
