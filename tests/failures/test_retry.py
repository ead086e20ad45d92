"""Retry policies per handler: attempts, backoff, errors that give up at once, timeouts, and partition isolation.

The worker runs in-process. The handlers of `tests.failures.handlers` fail
where a record's ``X-Fault`` header names a fault, and count every call,
rolled-back ones included, in ``test_app.invocations``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from datetime import datetime

import anyio
import pytest

from tests.failures import handlers as failure_handlers
from tests.failures.helpers import FailureRows, record, sample
from tests.integration import helpers
from tests.support import kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

# The session timeout of `helpers.worker_settings`: the smallest one Kafka
# accepts by default (group.min.session.timeout.ms).
SESSION_TIMEOUT_S = 6.0


def gaps_s(times: list[datetime]) -> list[float]:
    """Return the seconds between consecutive timestamps."""
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]


async def test_retry_backoff_then_dead_letter(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, [record("k-0"), record("k-1", fault="ValueError"), record("k-2")])

    async with helpers.running_worker(failure_handlers.BackoffOrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
    letter = (await rows.letters_by_offset(topic))[1]
    gaps = gaps_s(await rows.call_times("k-1"))

    assert await rows.effect_keys() == ["k-0", "k-2"]
    assert await rows.invocations("k-1") == 5
    assert letter["reason"] == "handler_error"
    assert letter["status"] == "dead"
    assert letter["attempts"] == 5
    assert letter["first_error_type"] == "ValueError"
    assert letter["last_error_type"] == "ValueError"
    assert letter["last_error"] == "injected ValueError for k-1"
    assert worker.stats.retries == 4
    labels = {"group": group_id, "topic": topic, "kind": "handler"}
    assert sample(worker.metrics.registry, "consumer_retries_total", labels) == 4
    # The delay after attempt n is drawn from the upper half of
    # min(0.4, 0.2 * 2**(n-1)) seconds: at least 0.1, 0.2, 0.2 and 0.2 s.
    assert len(gaps) == 4
    for gap, minimum in zip(gaps, [0.1, 0.2, 0.2, 0.2], strict=True):
        assert gap >= minimum, gaps
    # Without the 0.4 s cap the last delay would be at least 0.8 s.
    assert gaps[3] < 0.7, gaps


@pytest.mark.parametrize(
    ("fault", "error_type"),
    [("KeyError", "KeyError"), ("PermanentError", "PermanentError")],
    ids=["give_up_on", "permanent_error"],
)
async def test_permanent_error_dead_letters_at_once(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: FailureRows,
    fault: str,
    error_type: str,
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, [record("k-0"), record("k-1", fault=fault), record("k-2")])

    # FaultyOrderHandler allows three attempts and gives up on KeyError at once.
    async with helpers.running_worker(failure_handlers.FaultyOrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
    letters = await rows.letters_by_offset(topic)

    assert await rows.effect_keys() == ["k-0", "k-2"]
    assert list(letters) == [1]
    assert letters[1]["reason"] == "permanent"
    assert letters[1]["last_error_type"] == error_type
    assert await rows.invocations("k-1") == 1
    assert letters[1]["attempts"] == 1
    assert worker.stats.dead_letter_reasons == {"permanent": 1}


async def test_timeout_dead_letters_as_timeout(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id, worker={"handler_timeout_s": 0.3})
    await kafka.produce(kafka_bootstrap, topic, [record("k-0", sleep_s=30), record("k-1")])

    # TwoAttemptOrderHandler allows two attempts.
    async with helpers.running_worker(failure_handlers.TwoAttemptOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
    letters = await rows.letters_by_offset(topic)

    assert await rows.effect_keys() == ["k-1"]
    assert list(letters) == [0]
    assert letters[0]["reason"] == "timeout"
    assert letters[0]["attempts"] == 2
    assert letters[0]["last_error_type"] == "TimeoutError"
    assert await rows.invocations("k-0") == 2


async def test_poisoned_partition_spares_other_partition(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    app_database: str,
    rows: FailureRows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumer")
    topic = topic_factory(2)
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    blocked = [record("p0-0", fault="ValueError"), record("p0-1"), record("p0-2")]
    free = [record(f"p1-{index}", partition=1) for index in range(5)]
    await kafka.produce(kafka_bootstrap, topic, [*blocked, *free])

    # Ten attempts 0.7 to 1.4 s apart keep partition 0 at offset 0 for longer
    # than the 6 s session timeout.
    async with helpers.running_worker(failure_handlers.SlowRetryOrderHandler(), config, partitions=2) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 0, 1: 5}, timeout_s=4.0)
        calls_while_other_done = await rows.invocations("p0-0")
        letters_while_other_done = await rows.dead_letters()
        with anyio.fail_after(30):
            while (await rows.next_offsets(group_id, topic)).get(0) != 3:
                await anyio.sleep(0.2)
        health = worker.health()
    letter = (await rows.letters_by_offset(topic, 0))[0]
    call_times = await rows.call_times("p0-0")
    actions = [getattr(record, "action", None) for record in caplog.records]

    assert calls_while_other_done < 10
    assert letters_while_other_done == []
    assert sorted(await rows.effect_keys()) == sorted(["p0-1", "p0-2", *(f"p1-{index}" for index in range(5))])
    assert letter["attempts"] == 10
    assert letter["reason"] == "handler_error"
    assert (call_times[-1] - call_times[0]).total_seconds() > SESSION_TIMEOUT_S
    # The member kept its partitions through the backoff: one assignment, no revocation.
    assert worker.stats.rebalances == 1
    assert actions.count("partitions_assigned") == 1
    assert "partitions_revoked" not in actions
    assert sorted(health["assigned"]) == [f"{topic}-0", f"{topic}-1"]
    assert health["halted"] == {}
