"""The quake-store example through the testing kit, on a slice of a day of the USGS feed."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from consumer.testing import InboxHarness, Record, WorkerScenario
from examples.quakes.handler import QuakeHandler
from tests.support.process import REPO_ROOT

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DATA = REPO_ROOT / "examples" / "quakes" / "data" / "usgs-all-day-2025-05-20.jsonl"
# The first 600 lines are about three hourly polls: most events arrive
# several times, as the whole file has them.
LINES = 600
COUNT_EVENTS = "SELECT count(*) FROM quake_store.applied_events WHERE event_id = $1"

HarnessFactory = Callable[..., InboxHarness]
ScenarioFactory = Callable[..., WorkerScenario]


def slice_of_feed(count: int = LINES) -> list[bytes]:
    with DATA.open("rb") as lines:
        return [line for _, line in zip(range(count), lines, strict=False)]


def quake_id(event: dict[str, object]) -> str:
    entity = event["entity"]
    assert isinstance(entity, dict)
    return str(entity["id"])


async def test_feed_slice_applies_each_version_once(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(QuakeHandler)
    lines = slice_of_feed()
    events = [json.loads(line) for line in lines]
    versions = {event["event_id"] for event in events}
    messages = harness.messages_from_jsonl(lines, key=quake_id, partitions=4)

    delivery = await harness.deliver(*messages)

    assert delivery.applied == len(versions)
    # Repeated polls, and a revision under an unchanged version, which the
    # handler logs instead of dead-lettering.
    assert delivery.key_duplicates == len(lines) - len(versions)
    assert delivery.dead_lettered == 0
    for version in versions:
        await harness.assert_applied_once(version, effects=COUNT_EVENTS)


async def test_each_quake_keeps_its_newest_version(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(QuakeHandler)
    lines = slice_of_feed()
    newest: dict[str, str] = {}
    for event in map(json.loads, lines):
        newest[quake_id(event)] = max(newest.get(quake_id(event), ""), event["updated_at"])

    # Reversed, every older version arrives after a newer one.
    await harness.deliver(*harness.messages_from_jsonl(reversed(lines), key=quake_id, partitions=4))

    rows = await harness.state.fetch("SELECT quake_id, updated_at FROM quake_store.quakes")
    stored = {row["quake_id"]: row["updated_at"] for row in rows}
    assert len(stored) == len(newest)
    for quake, updated_at in newest.items():
        assert stored[quake] == datetime.fromisoformat(updated_at).astimezone(UTC)


async def test_redelivered_batch_changes_nothing(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(QuakeHandler)
    messages = harness.messages_from_jsonl(slice_of_feed(100), key=quake_id, partitions=2)
    delivered = await harness.deliver(*messages)
    before = await harness.state.fetch("SELECT * FROM quake_store.quakes ORDER BY quake_id")

    again = await harness.redeliver(delivered)

    assert again.position_duplicates == 100
    assert again.applied == 0
    assert await harness.state.fetch("SELECT * FROM quake_store.quakes ORDER BY quake_id") == before


async def test_two_deployments_store_each_version_once(consumer_scenario: ScenarioFactory) -> None:
    scenario = consumer_scenario(QuakeHandler, partitions=2)
    lines = slice_of_feed(40)
    records = [Record(line.rstrip(b"\n"), key=quake_id(json.loads(line)), partition=None) for line in lines]

    first, second = await scenario.run_two_deployments(*records)

    versions = {json.loads(line)["event_id"] for line in lines}
    assert first.applied + second.applied == len(versions)
    for version in versions:
        await scenario.assert_applied_once(version, effects=COUNT_EVENTS)
