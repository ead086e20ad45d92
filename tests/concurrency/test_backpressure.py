"""Backpressure: what a worker buffers stays bounded while its handler is slower than the broker.

A partition is paused once two batches of it are queued. Before the pause,
the worker takes what the client already prefetched for it (one more poll),
so its queue contains at most two batches and two polls. Every partition is
paused once the buffered key and value bytes reach
``worker.max_buffered_bytes``, which the last poll can exceed by one poll.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import pytest

from consumer.worker import Worker
from tests.concurrency import handlers
from tests.integration import helpers
from tests.support import kafka

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MESSAGES = 600
BATCH = 20
POLL_RECORDS = 30


def padded_records(value_bytes: int) -> list[kafka.Record]:
    records = []
    for index in range(MESSAGES):
        key = f"bp-{index}"
        value = json.dumps({"order_id": key, "amount": 1, "note": "x" * value_bytes}).encode()
        records.append(
            kafka.Record(partition=0, key=key.encode(), value=value, headers=[("Idempotency-Key", key.encode())])
        )
    return records


async def sample_buffers(worker: Worker, samples: list[tuple[int, int]]) -> None:
    """Record (largest queue, buffered bytes) every 5 ms until cancelled."""
    while True:
        processors = list(worker._processors.values())
        samples.append((max((p.backlog for p in processors), default=0), worker.buffered_bytes()))
        await anyio.sleep(0.005)


async def drain_sampled(
    kafka_bootstrap: str, topic: str, app_database: str, rows: helpers.Rows, worker_overrides: dict[str, int]
) -> list[tuple[int, int]]:
    group_id = helpers.unique_group()
    config = helpers.worker_settings(
        kafka_bootstrap, app_database, topic, group_id, worker={"max_batch_size": BATCH, **worker_overrides}
    )
    config.kafka.fetch_max_records = POLL_RECORDS
    samples: list[tuple[int, int]] = []
    async with (
        helpers.running_worker(handlers.SlowBatchHandler(), config) as worker,
        anyio.create_task_group() as sampler,
    ):
        sampler.start_soon(sample_buffers, worker, samples)
        await rows.wait_for_next_offsets(group_id, topic, {0: MESSAGES}, timeout_s=60)
        sampler.cancel_scope.cancel()
    assert sorted(await rows.effect_keys()) == sorted(f"bp-{index}" for index in range(MESSAGES))
    return samples


async def test_queue_stays_under_two_batches_and_polls(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: helpers.Rows
) -> None:
    topic = topic_factory()
    await kafka.produce(kafka_bootstrap, topic, padded_records(100))

    samples = await drain_sampled(kafka_bootstrap, topic, app_database, rows, {})

    largest_queue = max(queue for queue, _ in samples)
    assert largest_queue <= 2 * BATCH + 2 * POLL_RECORDS
    # The queue did fill up, so the bound above was reached and held.
    assert largest_queue >= 2 * BATCH


async def test_buffered_bytes_stay_under_the_byte_bound(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: helpers.Rows
) -> None:
    topic = topic_factory()
    records = padded_records(1000)
    await kafka.produce(kafka_bootstrap, topic, records)
    largest_record = max(len(record.value or b"") + len(record.key or b"") for record in records)
    # Smaller than two batches of these records, so the byte bound is the one that holds.
    bytes_limit = 15 * largest_record

    samples = await drain_sampled(kafka_bootstrap, topic, app_database, rows, {"max_buffered_bytes": bytes_limit})

    largest_buffer = max(buffered for _, buffered in samples)
    assert largest_buffer <= bytes_limit + POLL_RECORDS * largest_record
    assert largest_buffer >= bytes_limit
