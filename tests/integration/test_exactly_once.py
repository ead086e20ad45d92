"""Exactly-once effects under redelivery, duplicate keys, handler failures and an unwritable dead-letter table.

Each test runs the worker in-process against the embedded broker (or
CONSUMER_TEST_KAFKA_BOOTSTRAP) and a fresh database, and reads the outcome
from the rows that the test handlers and the framework write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import asyncpg
import pytest

from tests.integration import helpers
from tests.integration.helpers import Rows, order_record
from tests.support import handlers, kafka
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

KEYS = [f"k-{index}" for index in range(5)]


async def wait_for_kafka_committed(bootstrap: str, group_id: str, topic: str, expected: dict[int, int]) -> None:
    async def committed() -> bool:
        return await kafka.fetch_committed(bootstrap, group_id, topic, list(expected)) == expected

    await wait_for(committed, timeout_s=15, interval_s=0.3, description=f"Kafka offsets {expected} of {group_id}")


async def test_redelivery_after_kafka_offset_reset_applies_nothing(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(
        kafka_bootstrap, app_database, topic, group_id, worker={"kafka_commit_interval_s": 0.2}
    )
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS])

    async with helpers.running_worker(handlers.OrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 5})
        await wait_for_kafka_committed(kafka_bootstrap, group_id, topic, {0: 5})
    before = await rows.positions(group_id, topic)
    await helpers.commit_kafka_offsets(kafka_bootstrap, group_id, topic, {0: 0})
    reset = await kafka.fetch_committed(kafka_bootstrap, group_id, topic, [0])

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker:
        # A sixth record shows the restarted worker consumes: once it is
        # applied, anything redelivered before it was handled too.
        await kafka.produce(kafka_bootstrap, topic, [order_record("k-5")])
        await rows.wait_for_next_offsets(group_id, topic, {0: 6})
        await wait_for_kafka_committed(kafka_bootstrap, group_id, topic, {0: 6})
    after = await rows.positions(group_id, topic)

    assert reset == {0: 0}
    assert await rows.effect_keys() == [*KEYS, "k-5"]
    assert before[0]["applied"] == 5
    assert after[0]["applied"] == 6
    assert after[0]["key_duplicates"] == 0
    assert after[0]["dead_lettered"] == 0
    assert worker.stats.applied == 1
    for key in KEYS:
        assert await rows.invocations(key) == 1, key


async def test_new_group_same_scope_applies_nothing(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    scope = helpers.unique_group("scope")
    first = helpers.worker_settings(kafka_bootstrap, app_database, topic, helpers.unique_group(), dedup_scope=scope)
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS])
    async with helpers.running_worker(handlers.OrderHandler(), first):
        await rows.wait_for_next_offsets(scope, topic, {0: 5})

    # A new group has no Kafka offsets, so Kafka alone would start it at the
    # earliest offset. The stored position must win.
    second = helpers.worker_settings(kafka_bootstrap, app_database, topic, helpers.unique_group(), dedup_scope=scope)
    assert second.kafka.auto_offset_reset == "earliest"
    async with helpers.running_worker(handlers.OrderHandler(), second) as worker:
        await kafka.produce(kafka_bootstrap, topic, [order_record("k-5")])
        await rows.wait_for_next_offsets(scope, topic, {0: 6})

    assert await rows.effect_keys() == [*KEYS, "k-5"]
    assert worker.stats.fetched == 1
    assert worker.stats.applied == 1
    for key in KEYS:
        assert await rows.invocations(key) == 1, key


async def test_lost_position_redelivery_deduplicated_by_key(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory()
    scope = helpers.unique_group("scope")
    first = helpers.worker_settings(kafka_bootstrap, app_database, topic, helpers.unique_group(), dedup_scope=scope)
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS])
    async with helpers.running_worker(handlers.OrderHandler(), first):
        await rows.wait_for_next_offsets(scope, topic, {0: 5})

    # Without the position row and with a new group, all five records are
    # redelivered from offset 0, and only the inbox keeps them from being applied.
    await rows.connection.execute("DELETE FROM consumer.positions WHERE dedup_scope = $1", scope)
    second = helpers.worker_settings(kafka_bootstrap, app_database, topic, helpers.unique_group(), dedup_scope=scope)
    async with helpers.running_worker(handlers.OrderHandler(), second) as worker:
        await rows.wait_for_next_offsets(scope, topic, {0: 5})
    position = (await rows.positions(scope, topic))[0]

    assert await rows.effect_keys() == KEYS
    assert position["key_duplicates"] == 5
    assert position["applied"] == 0
    assert worker.stats.key_duplicates == 5
    assert worker.stats.handler_calls == 0
    for key in KEYS:
        assert await rows.invocations(key) == 1, key


async def test_same_key_on_other_partition_applied_once(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: Rows
) -> None:
    topic = topic_factory(2)
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, [order_record("k-0", partition=0), order_record("k-1", partition=0)])

    async with helpers.running_worker(handlers.OrderHandler(), config, partitions=2):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
        # The producer resent k-1, which landed on the other partition at a new offset.
        await kafka.produce(
            kafka_bootstrap, topic, [order_record("k-1", partition=1), order_record("k-2", partition=1)]
        )
        await rows.wait_for_next_offsets(group_id, topic, {0: 2, 1: 2})
    positions = await rows.positions(group_id, topic)

    assert await rows.effect_keys() == ["k-0", "k-1", "k-2"]
    assert [(row["partition"], row["offset"]) for row in await rows.effects("k-1")] == [(0, 1)]
    assert positions[1]["key_duplicates"] == 1
    assert positions[1]["applied"] == 1
    assert positions[0]["key_duplicates"] == 0
    assert await rows.invocations("k-1") == 1
    assert await rows.inbox_keys(group_id) == ["k-0", "k-1", "k-2"]


async def test_failed_message_dead_lettered_and_later_ones_applied(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id, worker={"max_attempts": 3})
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"k-2": {"raise": "ValueError", "message": "no stock"}}))
    poisoned = kafka.Record(
        key=b"\x00\xff order-2",
        value=b'{"order_id": "k-2", "amount": 7}',
        headers=[("Idempotency-Key", b"k-2"), ("trace", b"\xfe\x00\xff"), ("trace", b"again"), ("empty", None)],
    )
    records = [order_record("k-0"), order_record("k-1"), poisoned, order_record("k-3"), order_record("k-4")]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 5})
        running = worker.health()
    dead_letters = await rows.dead_letters()
    position = (await rows.positions(group_id, topic))[0]

    assert await rows.effect_keys() == ["k-0", "k-1", "k-3", "k-4"]
    assert await rows.invocations("k-2") == 3
    assert running["halted"] == {}
    assert len(dead_letters) == 1
    letter = dead_letters[0]
    assert (letter["topic"], letter["partition"], letter["offset"]) == (topic, 0, 2)
    assert letter["reason"] == "handler_error"
    assert letter["attempts"] == 3
    assert letter["first_error_type"] == "ValueError"
    assert letter["last_error_type"] == "ValueError"
    assert letter["last_error"] == "no stock"
    assert "ValueError: no stock" in letter["traceback"]
    assert letter["idempotency_key"] == "k-2"
    assert letter["handler"] == handlers.OrderHandler.name()
    assert letter["key"] == poisoned.key
    assert letter["value"] == poisoned.value
    assert letter["header_names"] == [name for name, _ in poisoned.headers]
    assert letter["header_values"] == [value for _, value in poisoned.headers]
    assert position["dead_lettered"] == 1
    assert position["applied"] == 4
    # The dead letter is committed no later than the effects of the messages
    # after it: a later effect never becomes durable while k-2 is unresolved.
    for effect in await rows.effects():
        if effect["offset"] > 2:
            assert effect["xid"] >= letter["xid"], effect
            assert effect["created_at"] >= letter["created_at"], effect


async def test_transient_failure_applied_on_retry(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id, worker={"max_attempts": 3})
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"k-1": {"raise": "ValueError", "times": 2}}))
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS[:3]])

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})

    assert await rows.effect_keys() == ["k-0", "k-1", "k-2"]
    assert await rows.invocations("k-1") == 3
    assert await rows.dead_letters() == []
    assert worker.stats.retries == 2
    assert (await rows.positions(group_id, topic))[0]["dead_lettered"] == 0


@pytest.fixture
async def app_role(app_database: str, pg_admin_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A login role without superuser rights that may use the tables of `app_database`: (role, URL)."""
    role = helpers.unique_group("consumer_app").replace("-", "_")
    password = "app-test-password"  # noqa: S105 - a throwaway role dropped after the test
    admin = await asyncpg.connect(app_database)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        for schema in ("consumer", "test_app"):
            await admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            await admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}")
            await admin.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}")
    finally:
        await admin.close()
    yield role, helpers.url_with_user(app_database, role, password)
    admin = await asyncpg.connect(app_database)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()


async def test_unwritable_dead_letter_table_halts_partition(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    app_role: tuple[str, str],
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    role, role_url = app_role
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, role_url, topic, group_id, worker={"max_attempts": 3})
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"k-2": {"raise": "ValueError"}}))
    await rows.connection.execute(f"REVOKE INSERT ON consumer.dead_letters FROM {role}")
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS])

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker:

        async def halted() -> dict[str, str]:
            reasons: dict[str, str] = worker.health()["halted"]
            return reasons

        halts = await wait_for(halted, timeout_s=20, description="the partition to be reported halted")
        await anyio.sleep(1.0)
        halted_keys = await rows.effect_keys()
        halted_positions = await rows.next_offsets(group_id, topic)
        halted_calls = {key: await rows.invocations(key) for key in ("k-3", "k-4")}

    assert halted_keys == ["k-0", "k-1"]
    assert halted_positions == {0: 2}
    assert halted_calls == {"k-3": 0, "k-4": 0}
    assert list(halts) == [f"{topic}-0"]
    assert "DeadLetterWriteError" in halts[f"{topic}-0"]
    assert f"cannot write the dead letter for {topic}/0/2" in caplog.text
    assert "permission denied for table dead_letters" in caplog.text
    assert await rows.dead_letters() == []

    await rows.connection.execute(f"GRANT INSERT ON consumer.dead_letters TO {role}")
    async with helpers.running_worker(handlers.OrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 5})
    dead_letters = await rows.dead_letters()

    assert await rows.effect_keys() == ["k-0", "k-1", "k-3", "k-4"]
    assert [(letter["offset"], letter["reason"], letter["attempts"]) for letter in dead_letters] == [
        (2, "handler_error", 3)
    ]
    assert (await rows.positions(group_id, topic))[0]["dead_lettered"] == 1


async def test_batch_handler_dead_letters_only_poisoned_key(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id, worker={"max_attempts": 3})
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"k-2": {"raise": "ValueError"}}))
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS])

    async with helpers.running_worker(handlers.OrderBatchHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 5})
    dead_letters = await rows.dead_letters()

    assert sorted(await rows.effect_keys()) == ["k-0", "k-1", "k-3", "k-4"]
    assert [(letter["offset"], letter["idempotency_key"], letter["attempts"]) for letter in dead_letters] == [
        (2, "k-2", 3)
    ]
    assert dead_letters[0]["last_error_type"] == "ValueError"
    assert (await rows.positions(group_id, topic))[0]["applied"] == 4


async def test_batch_single_attempt_spares_innocent_messages(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id, worker={"max_attempts": 1})
    monkeypatch.setenv(helpers.HOOKS_VAR, helpers.hooks_json({"k-2": {"raise": "ValueError"}}))
    await kafka.produce(kafka_bootstrap, topic, [order_record(key) for key in KEYS])

    async with helpers.running_worker(handlers.OrderBatchHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 5})
    dead_letters = await rows.dead_letters()

    # A failed call of the whole batch does not say which message failed, so
    # the innocent messages must get their own call before they are given up.
    assert [letter["idempotency_key"] for letter in dead_letters] == ["k-2"]
    assert sorted(await rows.effect_keys()) == ["k-0", "k-1", "k-3", "k-4"]


async def test_unwritable_dead_letter_table_keeps_messages_before_poison(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    app_role: tuple[str, str],
    rows: Rows,
) -> None:
    role, role_url = app_role
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, role_url, topic, group_id)
    await rows.connection.execute(f"REVOKE INSERT ON consumer.dead_letters FROM {role}")
    records = [order_record("k-0"), order_record("k-1"), order_record("k-2", value=b"not json"), order_record("k-3")]
    await kafka.produce(kafka_bootstrap, topic, records)

    async with helpers.running_worker(handlers.OrderHandler(), config) as worker:

        async def halted() -> dict[str, str]:
            reasons: dict[str, str] = worker.health()["halted"]
            return reasons

        await wait_for(halted, timeout_s=20, description="the partition to be reported halted")
        halted_keys = await rows.effect_keys()
        halted_positions = await rows.next_offsets(group_id, topic)

    # The undecodable record at offset 2 needs a dead letter, which cannot be
    # written. The two records before it are valid and need none.
    assert halted_keys == ["k-0", "k-1"]
    assert halted_positions == {0: 2}
