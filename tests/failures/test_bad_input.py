"""Bad input: null keys and values, bytes that are not UTF-8, odd headers, large values, bad JSON, invalid payloads.

Each case must be handled as the handler declares (applied, skipped or
dead-lettered with its raw bytes) and must never stop the worker: a good
message after it is applied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

import pytest

from tests.failures import handlers as failure_handlers
from tests.failures.helpers import FailureRows, record
from tests.integration import helpers
from tests.support import kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

# Below the default maximum message size of Kafka brokers and aiokafka producers (1 MiB).
LARGE_BYTES = 900 * 1024

ODD_HEADERS: list[tuple[str, bytes | None]] = [
    ("x-bin", b"\x00\xff\x10"),
    ("x-null", None),
    ("x-bin", b""),
    ("x-text", b"ok"),
]


def large_order(key: str, *, valid: bool) -> bytes:
    """Return a JSON order of about `LARGE_BYTES` bytes. An invalid one has its amount as a long string."""
    padding = "x" * LARGE_BYTES
    if valid:
        return json.dumps({"order_id": key, "amount": 1, "padding": padding}).encode()
    return json.dumps({"order_id": key, "amount": padding}).encode()


async def test_bad_input_never_stops_worker(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    records = [
        dataclasses.replace(record("n-0"), key=None),
        record("t-1", tombstone=True),
        record("u-2", kafka_key=b"\xff\x00\xfe"),
        record("u-3", kafka_key=b"\xff\x00\xfe\x80", value=b"not json"),
        record("h-4", value=b'{"order_id": "h-4", "amount": -1.5}', headers=ODD_HEADERS),
        record("big-5", value=large_order("big-5", valid=True)),
        record("big-6", value=large_order("big-6", valid=False)),
        record("j-7", value=b"{'order_id': 'j-7', 'amount': 1}"),
        record("v-8", value=b'{"order_id": 8, "amount": 1}'),
        record("g-9"),
    ]
    keys = [(record.headers[0][1] or b"").decode() for record in records]
    await kafka.produce(kafka_bootstrap, topic, records)

    # FaultyOrderHandler validates into a model, so a null value is dead-lettered.
    async with helpers.running_worker(failure_handlers.FaultyOrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 10}, timeout_s=30)
        health = worker.health()
    letters = await rows.letters_by_offset(topic)

    assert await rows.effect_keys() == ["n-0", "u-2", "big-5", "g-9"]
    assert {offset: letter["reason"] for offset, letter in letters.items()} == {
        1: "tombstone",
        3: "decode",
        4: "validation",
        6: "validation",
        7: "decode",
        8: "validation",
    }
    assert health["halted"] == {}
    for offset, letter in letters.items():
        assert letter["attempts"] == 1, offset
        assert letter["status"] == "dead", offset
        assert letter["last_error_type"] == "DecodeError", offset
        assert await rows.invocations(keys[offset]) == 0, offset
        # Key, value and headers are stored exactly as produced.
        assert letter["key"] == records[offset].key, offset
        assert letter["value"] == records[offset].value, offset
        assert letter["header_names"] == [name for name, _ in records[offset].headers], offset
        assert letter["header_values"] == [value for _, value in records[offset].headers], offset
    assert letters[1]["value"] is None
    assert letters[4]["header_values"][1:5] == [b"\x00\xff\x10", None, b"", b"ok"]
    assert len(letters[6]["value"]) > LARGE_BYTES
    assert "value does not match Order: amount" in letters[4]["last_error"]
    assert "value is not valid JSON" in letters[7]["last_error"]
    assert "null value (tombstone)" in letters[1]["last_error"]
    assert (await rows.effects("big-5"))[0]["order_id"] == "big-5"
    assert (await rows.effects("n-0"))[0]["offset"] == 0


async def test_tombstone_skipped_with_skip_policy(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, [record("s-0", tombstone=True), record("s-1")])

    async with helpers.running_worker(failure_handlers.SkipTombstonesHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
    position = (await rows.positions(group_id, topic))[0]

    assert await rows.effect_keys() == ["s-1"]
    assert await rows.dead_letters() == []
    assert await rows.invocations("s-0") == 0
    assert worker.stats.tombstones_skipped == 1
    assert position["applied"] == 1
    assert position["dead_lettered"] == 0


async def test_tombstone_handled_with_null_payload(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, [record("h-0", tombstone=True), record("h-1", amount=5)])

    async with helpers.running_worker(failure_handlers.HandleTombstonesHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
    effects = await rows.effects()

    assert await rows.dead_letters() == []
    assert [effect["idem_key"] for effect in effects] == ["h-0", "h-1"]
    # The handler writes NULL order fields when the payload is None.
    assert (effects[0]["order_id"], effects[0]["amount"]) == (None, None)
    assert (effects[1]["order_id"], effects[1]["amount"]) == ("h-1", 5)


async def test_dead_letter_logged_once_per_commit(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: FailureRows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumer")
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    # All three are on the topic before the worker starts, so they share a
    # batch: r-1's first failure rolls the batch back, dead letter of x-0 included.
    records = [record("x-0", value=b"not json"), record("r-1", fault="ValueError", fault_times=1), record("g-2")]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(failure_handlers.FaultyOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
    logged = [entry for entry in caplog.records if getattr(entry, "action", None) == "message_dead_lettered"]

    assert await rows.effect_keys() == ["r-1", "g-2"]
    assert await rows.invocations("r-1") == 2
    assert list(await rows.letters_by_offset(topic)) == [0]
    # One ERROR line per committed dead letter, not one per rolled-back write.
    assert [entry.offset for entry in logged] == [0]  # type: ignore[attr-defined]
