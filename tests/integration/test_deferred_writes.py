"""Statements deferred with `Context.defer`: sent with the batch, committed once, charged to their message on failure.

Records are produced before the worker starts, so each test's messages
arrive in one batch and share one buffer of deferred statements on the fast
path.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration import helpers
from tests.integration.helpers import Rows, order_record
from tests.support import handlers, kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

KEYS = [f"d-{index}" for index in range(8)]


async def _ledger(rows: Rows) -> list[tuple[str, int]]:
    records = await rows.connection.fetch("SELECT idem_key, amount FROM test_app.ledger ORDER BY idem_key")
    return [(record["idem_key"], record["amount"]) for record in records]


async def test_deferred_apply_once_despite_duplicates(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    # d-1 and d-4 are sent again by the producer, at new offsets.
    records = [order_record(key, amount=5) for key in KEYS] + [
        order_record("d-1", amount=5),
        order_record("d-4", amount=5),
    ]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.DeferredOrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: len(records)})
    position = (await rows.positions(group_id, topic))[0]

    assert sorted(await rows.effect_keys()) == KEYS
    assert await _ledger(rows) == [(key, 20) for key in KEYS]
    assert position["applied"] == len(KEYS)
    assert position["key_duplicates"] == 2
    assert worker.stats.dead_lettered == 0


async def test_failing_deferred_statement_dead_lettered(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    # An amount of 0 makes d-3's deferred ledger insert divide by zero, in
    # the database, after its handler call returned.
    records = [order_record(key, amount=0 if key == "d-3" else 4) for key in KEYS]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.DeferredOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: len(KEYS)})
    dead = await rows.dead_letters()

    applied = [key for key in KEYS if key != "d-3"]
    # d-3's effect row was deferred in the same savepoint as its failing
    # ledger row, so it was rolled back with it.
    assert sorted(await rows.effect_keys()) == applied
    assert await _ledger(rows) == [(key, 25) for key in applied]
    assert [(row["offset"], row["idempotency_key"]) for row in dead] == [(3, "d-3")]
    assert dead[0]["last_error_type"] == "DivisionByZeroError"
    assert dead[0]["value"] == records[3].value
    # Three attempts, the worker's max_attempts in these tests.
    assert dead[0]["attempts"] == 3


async def test_handler_failure_discards_deferred(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    # d-5 fails once: the fast path rolls back with d-0..d-4's statements
    # still deferred, and the redo must not send them a second time.
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"d-5": {"raise": "RuntimeError", "times": 1}}))
    await kafka.produce(kafka_bootstrap, topic, [order_record(key, amount=2) for key in KEYS])

    async with helpers.running_worker(handlers.DeferredOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: len(KEYS)})

    assert sorted(await rows.effect_keys()) == KEYS
    assert await _ledger(rows) == [(key, 50) for key in KEYS]
    assert await rows.invocations("d-5") == 2
    assert await rows.dead_letters() == []


async def test_key_ordering_shares_deferred_buffer(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    records = [order_record(key, amount=1) for key in KEYS]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.KeyOrderedDeferredHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: len(KEYS)})

    assert sorted(await rows.effect_keys()) == KEYS
    assert await _ledger(rows) == [(key, 100) for key in KEYS]
    for key in KEYS:
        assert await rows.invocations(key) == 1, key


async def test_batch_handler_deferred_failure_isolated(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    records = [order_record(key, amount=0 if key == "d-6" else 10) for key in KEYS]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.DeferredBatchHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: len(KEYS)})
    dead = await rows.dead_letters()

    applied = [key for key in KEYS if key != "d-6"]
    assert sorted(await rows.effect_keys()) == applied
    assert await _ledger(rows) == [(key, 10) for key in applied]
    assert [(row["offset"], row["idempotency_key"]) for row in dead] == [(6, "d-6")]
    assert dead[0]["last_error_type"] == "DivisionByZeroError"
