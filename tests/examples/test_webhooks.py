"""The webhook-ledger example through the testing kit, on a sample of real GitHub webhook deliveries."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from consumer.message import RawMessage
from consumer.testing import InboxHarness, Record, WorkerScenario
from examples.webhooks.handler import WebhookLedger
from tests.support.process import REPO_ROOT

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SAMPLE = REPO_ROOT / "examples" / "webhooks" / "data" / "deliveries-sample.jsonl"
COUNT_DELIVERIES = "SELECT count(*) FROM webhook_ledger.deliveries WHERE event_id = $1"
ISSUE_ID = 444500041

HarnessFactory = Callable[..., InboxHarness]
ScenarioFactory = Callable[..., WorkerScenario]


def sample_lines() -> list[bytes]:
    return [line for line in SAMPLE.read_bytes().splitlines() if line.strip()]


def entity_key(delivery: dict[str, object]) -> str | None:
    """Kafka key of a delivery: the object it is about, so its deliveries share a partition."""
    entity = delivery.get("entity")
    return f"{entity['kind']}:{entity['id']}" if isinstance(entity, dict) else None


async def entity_row(harness: InboxHarness, kind: str, entity_id: int) -> dict[str, object]:
    rows = await harness.state.fetch(
        "SELECT * FROM webhook_ledger.entities WHERE kind = $1 AND entity_id = $2", kind, entity_id
    )
    assert len(rows) == 1
    return dict(rows[0])


async def test_sample_applies_each_delivery_once(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(WebhookLedger)
    messages = harness.messages_from_jsonl(sample_lines(), key=entity_key, partitions=3)

    delivery = await harness.deliver(*messages)

    assert len(messages) == 48
    assert delivery.applied == 48
    assert delivery.dead_lettered == 0
    for message in messages:
        await harness.assert_applied_once(message, effects=COUNT_DELIVERIES)
    issue = await entity_row(harness, "issue", ISSUE_ID)
    assert issue["deliveries"] == 23


async def test_redelivered_webhook_is_recorded_once(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(WebhookLedger)
    (message,) = harness.messages_from_jsonl(sample_lines()[:1], key=entity_key)

    first, second = await harness.deliver_twice(message)

    assert first.applied == 1
    assert second.key_duplicates == 1
    await harness.assert_applied_once(message, effects=COUNT_DELIVERIES)
    issue = await entity_row(harness, "issue", ISSUE_ID)
    assert issue["deliveries"] == 1


async def test_out_of_order_deliveries_keep_the_newest(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(WebhookLedger)
    lines = [line for line in sample_lines() if json.loads(line)["entity"] == {"kind": "issue", "id": ISSUE_ID}]
    newest = max(json.loads(line)["occurred_at"] for line in lines)

    delivery = await harness.deliver(*harness.messages_from_jsonl(reversed(lines), key=entity_key))

    assert delivery.applied == 23
    issue = await entity_row(harness, "issue", ISSUE_ID)
    assert issue["deliveries"] == 23
    assert issue["last_occurred_at"] == datetime.fromisoformat(newest).astimezone(UTC)


async def test_racing_transactions_record_once(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(WebhookLedger)
    messages = harness.messages_from_jsonl(sample_lines()[:10])

    first, second = await harness.race(*messages)

    assert first.applied + second.applied == 10
    for message in messages:
        await harness.assert_applied_once(message, effects=COUNT_DELIVERIES)


async def test_delivery_without_guid_is_dead_lettered(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(WebhookLedger)
    broken = json.loads(sample_lines()[0])
    broken["event_id"] = ""
    message = harness.message(broken)

    delivery = await harness.deliver(message)

    assert delivery.dead_lettered == 1
    await harness.assert_dead_lettered(message, reason="validation")


async def test_crash_after_commit_records_once(consumer_scenario: ScenarioFactory) -> None:
    scenario = consumer_scenario(WebhookLedger, partitions=2)
    lines = sample_lines()[:12]
    records = [Record(line, key=entity_key(json.loads(line)), partition=index % 2) for index, line in enumerate(lines)]
    produced: list[RawMessage] = await scenario.produce(*records)

    report = await scenario.crash_after_commit()

    assert report.kafka_committed == {0: None, 1: None}
    assert report.restarted.applied == 0
    for message in produced:
        await scenario.assert_applied_once(message, effects=COUNT_DELIVERIES)
