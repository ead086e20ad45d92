"""Parking by Kafka key: a failed key waits in the dead-letter table while other keys go on, until a redrive.

The worker runs in-process with `ParkingOrderHandler`; redrives run as
``consumer dead-letters redrive`` subprocesses with the handler's fix
switched on through the environment.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import asyncpg
import pytest

from tests.failures import handlers as failure_handlers
from tests.failures.helpers import CliResult, FailureRows, record, run_cli
from tests.integration import helpers
from tests.support import kafka
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

# Keys A and B interleaved on one partition. A's second message fails for good.
INTERLEAVED = [
    record("A-1", kafka_key=b"A"),
    record("B-1", kafka_key=b"B"),
    record("A-2", kafka_key=b"A", fault="PermanentError"),
    record("B-2", kafka_key=b"B"),
    record("A-3", kafka_key=b"A"),
    record("B-3", kafka_key=b"B"),
    record("A-4", kafka_key=b"A"),
    record("B-4", kafka_key=b"B"),
]


async def test_parked_key_redriven_in_order(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, INTERLEAVED)

    async with helpers.running_worker(failure_handlers.ParkingOrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 8})
        parked_effects = await rows.effect_keys()
        parked_letters = await rows.letters_by_offset(topic)
        parked_keys = await rows.parked_keys()
        parked_calls = {key: await rows.invocations(key) for key in ("A-3", "A-4")}
        position = (await rows.positions(group_id, topic))[0]

        # The fix is deployed for the redrive only; the worker keeps running.
        redriven = await run_cli(app_database, "dead-letters", "redrive", "--status", "parked", "--json", fixed=True)
        redriven_effects = await rows.effect_keys()
        redriven_letters = await rows.letters_by_offset(topic)
        keys_after_redrive = await rows.parked_keys()

        await kafka.produce(kafka_bootstrap, topic, [record("A-5", kafka_key=b"A")])
        await rows.wait_for_next_offsets(group_id, topic, {0: 9})
        stats = worker.stats
    final_effects = await rows.effects()

    # While A is parked: B goes on, A's later messages wait in offset order.
    assert parked_effects == ["A-1", "B-1", "B-2", "B-3", "B-4"]
    assert sorted(parked_letters) == [2, 4, 6]
    assert [parked_letters[offset]["idempotency_key"] for offset in (2, 4, 6)] == ["A-2", "A-3", "A-4"]
    assert all(letter["status"] == "parked" for letter in parked_letters.values())
    assert parked_letters[2]["reason"] == "permanent"
    assert parked_letters[2]["last_error_type"] == "PermanentError"
    assert parked_letters[4]["reason"] == "parked_behind"
    assert parked_letters[6]["reason"] == "parked_behind"
    assert parked_letters[4]["attempts"] == 0
    assert parked_calls == {"A-3": 0, "A-4": 0}
    assert [(row["topic"], bytes(row["key"]), row["partition"], row["first_offset"]) for row in parked_keys] == [
        (topic, b"A", 0, 2)
    ]
    assert position["dead_lettered"] == 3
    assert position["applied"] == 5
    assert stats.parked == 3

    # The redrive applies A's parked messages once each, in offset order, and releases the key.
    assert redriven.exit_code == 0, redriven
    assert sorted(redriven.json()["resolved"]) == sorted(letter["id"] for letter in parked_letters.values())
    assert redriven.json()["failed"] == {}
    assert redriven_effects == [*parked_effects, "A-2", "A-3", "A-4"]
    assert all(letter["status"] == "resolved" for letter in redriven_letters.values())
    assert all(letter["resolved_at"] is not None for letter in redriven_letters.values())
    assert keys_after_redrive == []

    # A new A message is applied by the worker, not parked.
    assert [effect["idem_key"] for effect in final_effects] == [*redriven_effects, "A-5"]
    a_offsets = [effect["offset"] for effect in final_effects if effect["idem_key"].startswith("A-")]
    assert a_offsets == [0, 2, 4, 6, 8]
    assert sorted(await rows.letters_by_offset(topic)) == [2, 4, 6]

    # A second redrive, of parked or of resolved letters, changes nothing.
    again_parked = await run_cli(app_database, "dead-letters", "redrive", "--status", "parked", "--json", fixed=True)
    again_resolved = await run_cli(
        app_database, "dead-letters", "redrive", "--status", "resolved", "--json", fixed=True
    )
    assert again_parked.exit_code == 0, again_parked
    assert again_parked.json()["selected"] == 0
    assert again_resolved.exit_code == 0, again_resolved
    assert again_resolved.json()["resolved"] == []
    assert sorted(again_resolved.json()["skipped"]) == sorted(letter["id"] for letter in parked_letters.values())
    assert await rows.effects_per_key() == {f"{key}-{n}": 1 for key in "AB" for n in range(1, 5)} | {"A-5": 1}


async def wait_for_lock_waiters(connection: asyncpg.Connection, count: int) -> None:
    """Wait until `count` sessions of the ``consumer`` CLI wait for a row lock in this database."""

    async def waiting() -> bool:
        waiters: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'consumer' AND wait_event_type = 'Lock'"
        )
        return waiters >= count

    await wait_for(waiting, timeout_s=30, description=f"{count} redrives waiting for the parked key's lock")


async def test_concurrent_redrives_apply_parked_key_once(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, INTERLEAVED)
    async with helpers.running_worker(failure_handlers.ParkingOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 8})
    parked_ids = sorted((await rows.letter_ids(topic)).values())

    # The test holds the parked key's row lock until both redrives wait for
    # it, so their transactions overlap whatever their start-up times.
    results: list[CliResult] = []

    async def redrive() -> None:
        args = ("dead-letters", "redrive", "--status", "parked", "--json")
        results.append(await run_cli(app_database, *args, fixed=True))

    blocker = await asyncpg.connect(app_database)
    try:
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("SELECT 1 FROM consumer.parked_keys FOR UPDATE")
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(redrive)
            task_group.start_soon(redrive)
            await wait_for_lock_waiters(rows.connection, 2)
            await lock.commit()
    finally:
        await blocker.close()
    summaries = [result.json() for result in results]
    resolved = [dead_letter_id for summary in summaries for dead_letter_id in summary["resolved"]]

    assert [result.exit_code for result in results] == [0, 0], [str(result) for result in results]
    assert sorted(resolved) == parked_ids
    assert await rows.effects_per_key() == {f"{key}-{n}": 1 for key in "AB" for n in range(1, 5)}
    assert [key for key in await rows.effect_keys() if key.startswith("A-")] == ["A-1", "A-2", "A-3", "A-4"]
    assert await rows.parked_keys() == []
    # Each redrive accounts for every letter it selected: the one that lost
    # the race reports them as resolved elsewhere.
    for summary in summaries:
        accounted = len(summary["resolved"]) + len(summary["already_applied"]) + len(summary["skipped"])
        assert accounted == summary["selected"], summary
