"""The InboxHarness against real PostgreSQL: deliveries, the fault helpers and their assertions."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from consumer.testing import InboxHarness
from tests.testing_kit.handlers import (
    COUNT_ENTRIES,
    COUNT_NOTIFICATIONS,
    LeakyHandler,
    LedgerHandler,
    UnkeyedLedgerHandler,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HarnessFactory = Callable[..., InboxHarness]


def order(order_id: str, amount: int = 10) -> dict[str, object]:
    return {"order_id": order_id, "amount": amount}


async def test_deliver_applies_each_message(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)

    delivery = await harness.deliver(order("o-1"), order("o-2"), order("o-3"))

    assert delivery.applied == 3
    assert delivery.duplicates == 0
    assert delivery.errors == ()
    assert await harness.state.positions() == {("kit-orders", 0): 3}
    for order_id in ("o-1", "o-2", "o-3"):
        await harness.assert_applied_once(order_id, effects=COUNT_ENTRIES)


async def test_message_numbers_offsets_per_partition(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)

    first = harness.message(order("o-1"), key="customer-7", headers={"trace": "abc"})
    second = harness.message(order("o-2"), partition=1)
    third = harness.message(order("o-3"))

    assert (first.partition, first.offset) == (0, 0)
    assert (second.partition, second.offset) == (1, 0)
    assert (third.partition, third.offset) == (0, 1)
    assert first.key == b"customer-7"
    assert first.headers == (("trace", b"abc"),)
    assert first.value == b'{"amount":10,"order_id":"o-1"}'


async def test_deliver_twice_skips_the_copy_by_key(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)

    first, second = await harness.deliver_twice(order("o-1"))

    assert first.applied == 1
    assert second.applied == 0
    assert second.key_duplicates == 1
    assert second.messages[0].offset == first.messages[0].offset + 1
    await harness.assert_applied_once(first.messages[0], effects=COUNT_ENTRIES)


async def test_deliver_twice_in_one_batch(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)

    both, empty = await harness.deliver_twice(order("o-1"), same_batch=True)

    assert both.applied == 1
    assert both.key_duplicates == 1
    assert empty.outcomes == ()
    await harness.assert_applied_once("o-1", effects=COUNT_ENTRIES)


async def test_redeliver_skips_by_position(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)
    delivered = await harness.deliver(order("o-1"), order("o-2"))

    again = await harness.redeliver(delivered)

    assert again.applied == 0
    assert again.position_duplicates == 2
    await harness.assert_applied_once("o-1", effects=COUNT_ENTRIES)
    await harness.assert_applied_once("o-2", effects=COUNT_ENTRIES)


async def test_race_applies_once(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)
    messages = [harness.message(order(f"o-{index}")) for index in range(5)]

    deliveries = await harness.race(*messages, copies=3)

    assert sorted(delivery.applied for delivery in deliveries) == [0, 0, 5]
    assert sorted(delivery.position_duplicates for delivery in deliveries) == [0, 5, 5]
    for message in messages:
        await harness.assert_applied_once(message, effects=COUNT_ENTRIES)


async def test_race_after_earlier_batches(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)
    await harness.deliver(order("o-0"))
    late = harness.message(order("o-1"))

    first, second = await harness.race(late)

    assert first.applied + second.applied == 1
    assert first.position_duplicates + second.position_duplicates == 1
    await harness.assert_applied_once(late, effects=COUNT_ENTRIES)


async def test_race_rejects_two_partitions(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)

    with pytest.raises(ValueError, match="one partition"):
        await harness.race(harness.message(order("o-1")), harness.message(order("o-2"), partition=1))


async def test_failed_attempts_roll_back(consumer_harness: HarnessFactory) -> None:
    handler = LedgerHandler(failures={"o-2": 2})
    harness = consumer_harness(handler)

    delivery = await harness.deliver(order("o-1"), order("o-2"), order("o-3"))

    assert delivery.applied == 3
    assert delivery.dead_lettered == 0
    assert [str(error) for error in delivery.errors] == ["order o-2: injected failure"] * 2
    assert handler.calls["o-2"] == 3
    for order_id in ("o-1", "o-2", "o-3"):
        await harness.assert_applied_once(order_id, effects=COUNT_ENTRIES)


async def test_exhausted_attempts_dead_letter(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler(failures={"o-1": 99}), max_attempts=2)
    message = harness.message(order("o-1"))

    delivery = await harness.deliver(message)

    assert delivery.dead_lettered == 1
    assert delivery.dead_letter_reasons == ["handler_error"]
    await harness.assert_dead_lettered(message, reason="handler_error")
    with pytest.raises(AssertionError, match="was dead_lettered, not applied"):
        await harness.assert_applied_once(message)


async def test_invalid_payload_dead_letters(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)
    message = harness.message({"order_id": "o-1"})

    delivery = await harness.deliver(message)

    assert delivery.applied == 0
    assert delivery.dead_lettered == 1
    await harness.assert_dead_lettered(message, reason="validation")


async def test_unkeyed_messages_dedup_by_position(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(UnkeyedLedgerHandler)
    message = harness.message(order("o-1"))

    await harness.deliver(message)
    again = await harness.redeliver([message])
    copy = await harness.deliver(harness.copy_of(message))

    assert again.position_duplicates == 1
    # Without a key, a copy at a new offset is a new message.
    assert copy.applied == 1
    await harness.assert_applied_once(message)


async def test_assert_applied_once_reports_a_missing_message(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)

    with pytest.raises(AssertionError, match="has no dedup record"):
        await harness.assert_applied_once("never-sent")


async def test_assert_applied_once_catches_a_leaked_effect(consumer_harness: HarnessFactory) -> None:
    handler = LeakyHandler(failures={"o-1": 1})
    harness = consumer_harness(handler)
    handler.notify_dsn = harness.dsn

    await harness.deliver(order("o-1"))

    await harness.assert_applied_once("o-1", effects=COUNT_ENTRIES)
    with pytest.raises(AssertionError, match="has 2 effect"):
        await harness.assert_applied_once("o-1", effects=COUNT_NOTIFICATIONS)


async def test_effects_as_a_coroutine_function(consumer_harness: HarnessFactory) -> None:
    harness = consumer_harness(LedgerHandler)
    await harness.deliver(order("o-1", amount=7))

    async def total_amount(connection: asyncpg.Connection, key: str) -> int:
        return int(await connection.fetchval("SELECT sum(amount) FROM kit_ledger.entries WHERE order_id = $1", key))

    await harness.assert_applied_once("o-1", effects=total_amount, expected_effects=7)


async def test_consumer_database_has_the_schema(consumer_database: str) -> None:
    connection = await asyncpg.connect(consumer_database)
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'consumer'"
        )
    finally:
        await connection.close()

    assert tables >= 5
