"""Records a handler cannot decode: dead-lettered once, stored byte for byte, and never stopping the partition."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration import helpers
from tests.integration.helpers import Rows, order_record
from tests.support import handlers, kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

UNDECODABLE = b"\xff\xfe{not json"
SCHEMA_INVALID = b'{"order_id":4}'


async def test_undecodable_and_invalid_values_dead_lettered_once(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    records = [
        order_record("k-0"),
        order_record("k-1", value=UNDECODABLE),
        order_record("k-2"),
        order_record("k-3", value=SCHEMA_INVALID),
        order_record("k-4"),
    ]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 5})
        health = worker.health()
    dead_letters = await rows.dead_letters()
    position = (await rows.positions(group_id, topic))[0]

    assert await rows.effect_keys() == ["k-0", "k-2", "k-4"]
    assert [(letter["offset"], letter["reason"], letter["attempts"]) for letter in dead_letters] == [
        (1, "decode", 1),
        (3, "validation", 1),
    ]
    assert dead_letters[0]["value"] == UNDECODABLE
    assert dead_letters[1]["value"] == SCHEMA_INVALID
    assert [letter["last_error_type"] for letter in dead_letters] == ["DecodeError", "DecodeError"]
    assert "order_id" in dead_letters[1]["last_error"]
    assert [letter["status"] for letter in dead_letters] == ["dead", "dead"]
    assert position["dead_lettered"] == 2
    assert position["applied"] == 3
    assert await rows.invocations("k-1") == 0
    assert await rows.invocations("k-3") == 0
    assert health["started"] is True
    assert health["halted"] == {}
    assert worker.stats.retries == 0


async def test_tombstone_dead_lettered_for_payload_model(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    tombstone = kafka.Record(key=b"order-1", value=None, headers=[("Idempotency-Key", b"k-1")])
    await kafka.produce(kafka_bootstrap, topic, [order_record("k-0"), tombstone, order_record("k-2")])

    async with helpers.running_worker(handlers.OrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
    dead_letters = await rows.dead_letters()

    # OrderHandler declares a payload model, so a null value cannot be an
    # order, and the handler is never called with a payload of None.
    assert handlers.OrderHandler.tombstone_policy() == "dead_letter"
    assert await rows.effect_keys() == ["k-0", "k-2"]
    assert await rows.invocations("k-1") == 0
    assert [(letter["offset"], letter["reason"], letter["attempts"]) for letter in dead_letters] == [
        (1, "tombstone", 1)
    ]
    assert dead_letters[0]["value"] is None
    assert dead_letters[0]["key"] == b"order-1"


async def test_dead_letter_keeps_headers_and_key_bytes(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    headers = [
        ("Idempotency-Key", b"k-0"),
        ("trace", b"\xff\xfe\x00binary"),
        ("trace", b"second value"),
        ("nothing", None),
        ("empty", b""),
        ("caf\u00e9", b"\xc3\xa9"),
    ]
    poison = kafka.Record(key=b"\x00\x01\xffkey", value=UNDECODABLE, headers=headers)
    await kafka.produce(kafka_bootstrap, topic, [poison, order_record("k-1")])

    async with helpers.running_worker(handlers.OrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
    dead_letters = await rows.dead_letters()

    assert len(dead_letters) == 1
    letter = dead_letters[0]
    assert letter["key"] == poison.key
    assert letter["value"] == UNDECODABLE
    assert letter["header_names"] == [name for name, _ in headers]
    assert letter["header_values"] == [value for _, value in headers]
    # The key is derived from the decoded message, and this one never decoded.
    assert letter["idempotency_key"] is None
    assert await rows.effect_keys() == ["k-1"]
