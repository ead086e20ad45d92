"""Infrastructure errors from a handler: the whole batch is retried, and the message is never dead-lettered."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.failures import handlers as failure_handlers
from tests.failures.helpers import FailureRows, record, sample
from tests.integration import helpers
from tests.support import kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_serialization_failure_retries_whole_batch(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    # On the topic before the worker starts, so the three share one batch.
    # s-1 raises asyncpg's SerializationError (SQLSTATE 40001) on its first three calls.
    records = [record("s-0"), record("s-1", fault="SerializationError", fault_times=3), record("s-2")]
    await kafka.produce(kafka_bootstrap, topic, records)

    # TwoAttemptOrderHandler allows two attempts: more failures than that
    # would dead-letter s-1 if they counted as attempts.
    async with helpers.running_worker(failure_handlers.TwoAttemptOrderHandler(), config) as worker:
        await rows.wait_for_next_offsets(group_id, topic, {0: 3})
    labels = {"group": group_id, "topic": topic}
    position = (await rows.positions(group_id, topic))[0]

    assert await rows.effect_keys() == ["s-0", "s-1", "s-2"]
    assert await rows.dead_letters() == []
    assert await rows.invocations("s-1") == 4
    # s-0 was applied again in each retried transaction, and committed once.
    assert await rows.invocations("s-0") == 4
    assert await rows.invocations("s-2") == 1
    assert worker.stats.infrastructure_retries == 3
    assert worker.stats.retries == 0
    assert sample(worker.metrics.registry, "consumer_retries_total", {**labels, "kind": "infrastructure"}) == 3
    assert sample(worker.metrics.registry, "consumer_retries_total", {**labels, "kind": "handler"}) == 0
    assert position["applied"] == 3
    assert position["dead_lettered"] == 0
