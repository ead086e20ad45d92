"""A reused idempotency key (same key, different payload) under each `on_key_conflict` policy.

Every test sends the same six records in two rounds. The first round is on
the topic before the worker starts, so its first fetch contains all four and
they are applied in one batch transaction; the second round arrives after
that batch has committed, in a later one:

- offset 0: key c-1, amount 1 (applied)
- offset 1: key c-1, amount 2 (a conflict within the batch)
- offsets 2 and 3: key d-1 twice with the same payload (a duplicate within the batch)
- offset 4: key c-1, amount 3 (a conflict across batches)
- offset 5: key d-1, same payload again (a duplicate across batches)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from consumer import Handler, Worker
from tests.failures import handlers as failure_handlers
from tests.failures.helpers import FailureRows, record, sample
from tests.integration import helpers
from tests.support import kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

FIRST_ROUND = [record("c-1", amount=1), record("c-1", amount=2), record("d-1"), record("d-1")]
SECOND_ROUND = [record("c-1", amount=3), record("d-1")]


@dataclass(frozen=True)
class Rounds:
    """What `run_rounds` observed."""

    worker: Worker
    # Batch transactions committed for the first round: 1 when it was applied as one batch.
    first_round_batches: int
    # Transaction id of the first round's batch.
    first_batch_xid: int


async def run_rounds(
    handler: Handler[Any], kafka_bootstrap: str, topic: str, database_url: str, rows: FailureRows
) -> Rounds:
    """Run `handler` over both rounds and wait until all six records are handled."""
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, database_url, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, FIRST_ROUND)
    async with helpers.running_worker(handler, config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 4})
        first_round_batches = worker.stats.batches
        first_batch_xid = (await rows.effects("c-1"))[0]["xid"]
        await kafka.produce(kafka_bootstrap, topic, SECOND_ROUND)
        await rows.wait_for_next_offsets(group_id, topic, {0: 6})
    return Rounds(worker, first_round_batches, first_batch_xid)


def conflict_count(worker: Worker, topic: str) -> float:
    labels = {"group": worker.group_id, "topic": topic}
    return sample(worker.metrics.registry, "consumer_key_conflicts_total", labels)


def actions(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [entry for entry in caplog.records if getattr(entry, "action", None) == action]


async def test_reused_key_dead_lettered_by_default(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    rounds = await run_rounds(failure_handlers.FaultyOrderHandler(), kafka_bootstrap, topic, app_database, rows)
    worker = rounds.worker
    letters = await rows.letters_by_offset(topic)
    effects = await rows.effects()
    position = (await rows.positions(worker.group_id, topic))[0]

    assert [(effect["idem_key"], effect["amount"]) for effect in effects] == [("c-1", 1), ("d-1", 1)]
    assert sorted(letters) == [1, 4]
    for offset in (1, 4):
        assert letters[offset]["reason"] == "conflict", offset
        assert letters[offset]["status"] == "dead", offset
        assert letters[offset]["idempotency_key"] == "c-1", offset
        assert "already applied with a different payload" in letters[offset]["last_error"], offset
    # Offset 1 was dead-lettered in the first batch's transaction, offset 4 in a later one.
    # Dead letters are written in a savepoint, whose subtransaction id comes
    # after its batch's id and before the next batch's.
    assert rounds.first_round_batches == 1
    assert letters[1]["xid"] >= rounds.first_batch_xid
    assert letters[4]["xid"] > letters[1]["xid"]
    assert letters[4]["created_at"] > letters[1]["created_at"]
    assert await rows.invocations("c-1") == 1
    assert conflict_count(worker, topic) == 2
    assert worker.stats.conflicts == 2
    assert position["key_duplicates"] == 2
    assert position["dead_lettered"] == 2


async def test_reused_key_logged_with_log_policy(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: FailureRows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="consumer")
    topic = topic_factory()
    rounds = await run_rounds(failure_handlers.LoggingConflictHandler(), kafka_bootstrap, topic, app_database, rows)
    worker = rounds.worker
    warnings = actions(caplog, "key_conflict_skipped")
    position = (await rows.positions(worker.group_id, topic))[0]

    assert rounds.first_round_batches == 1
    assert [(effect["idem_key"], effect["amount"]) for effect in await rows.effects()] == [("c-1", 1), ("d-1", 1)]
    assert await rows.dead_letters() == []
    assert [entry.offset for entry in warnings] == [1, 4]  # type: ignore[attr-defined]
    assert all(entry.levelno == logging.WARNING for entry in warnings)
    assert all("'c-1' was already applied with a different payload" in entry.getMessage() for entry in warnings)
    assert await rows.invocations("c-1") == 1
    assert conflict_count(worker, topic) == 2
    assert position["key_duplicates"] == 4
    assert position["dead_lettered"] == 0


async def test_reused_key_duplicate_with_duplicate_policy(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: FailureRows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="consumer")
    topic = topic_factory()
    rounds = await run_rounds(failure_handlers.DuplicateConflictHandler(), kafka_bootstrap, topic, app_database, rows)
    worker = rounds.worker
    position = (await rows.positions(worker.group_id, topic))[0]

    assert rounds.first_round_batches == 1
    assert [(effect["idem_key"], effect["amount"]) for effect in await rows.effects()] == [("c-1", 1), ("d-1", 1)]
    assert await rows.dead_letters() == []
    assert await rows.invocations("c-1") == 1
    assert position["key_duplicates"] == 4
    assert position["dead_lettered"] == 0
    # A plain duplicate is neither a conflict nor worth a warning, within a batch or across batches.
    assert actions(caplog, "key_conflict_skipped") == []
    assert conflict_count(worker, topic) == 0
    assert worker.stats.conflicts == 0
