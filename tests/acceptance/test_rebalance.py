"""Rebalances while messages are in flight move partitions without losing or repeating an effect.

aiokafka's rebalance protocol is eager: every member gives up all its
partitions before the new assignment, so even a partition that stays with a
worker is stopped mid-batch and started again from its stored position.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from tests.acceptance.helpers import (
    ASSIGNED_LINE,
    RETRY_LINE,
    Deployment,
    Rows,
    assert_running,
    lines_with,
    order_record,
    wait_for_exit,
    wait_for_output,
)
from tests.support.kafka import Record
from tests.support.process import WorkerProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

Deploy = Callable[[int], Awaitable[tuple[Deployment, Rows]]]

_FAILURE_MARKERS = ("Traceback", "IllegalStateError", "CommitFailedError")


async def assert_kafka_not_ahead(deployment: Deployment, rows: Rows, partitions: int) -> dict[int, int | None]:
    """Check that no committed Kafka offset is ahead of the stored position, and return the offsets."""
    # Kafka is read before PostgreSQL. Positions only grow, so a position read
    # later is at least the one that was stored when Kafka was read.
    committed = await deployment.kafka_committed(partitions)
    positions = await rows.positions()
    for partition, offset in committed.items():
        if offset is not None:
            assert offset <= positions.get(partition, 0), f"Kafka {committed} ahead of PostgreSQL {positions}"
    return committed


async def wait_for_effects(
    rows: Rows, minimum: dict[int, int], workers: list[WorkerProcess], *, timeout_s: float
) -> None:
    """Wait until each partition in ``minimum`` has at least that many committed effects, while ``workers`` run."""
    started = time.monotonic()
    while True:
        counts = await rows.effects_per_partition()
        if all(counts.get(partition, 0) >= count for partition, count in minimum.items()):
            return
        assert_running(workers)
        if time.monotonic() - started >= timeout_s:
            raise AssertionError(f"effects per partition {counts}, expected at least {minimum} within {timeout_s} s")
        await anyio.sleep(0.1)


async def wait_for_writers(rows: Rows, names: set[str], workers: list[WorkerProcess], *, timeout_s: float) -> None:
    """Wait until each worker in ``names`` has committed at least one effect, while ``workers`` run."""
    started = time.monotonic()
    while not names <= (writers := set((await rows.effect_workers()).values())):
        assert_running(workers)
        if time.monotonic() - started >= timeout_s:
            raise AssertionError(f"effects written by {sorted(writers)}, expected {sorted(names)} within {timeout_s} s")
        await anyio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_revoke_mid_batch_keeps_each_effect_once(deploy: Deploy) -> None:
    deployment, rows = await deploy(2)
    keys = {partition: [f"p{partition}-{number}" for number in range(10)] for partition in (0, 1)}
    await deployment.produce(
        [order_record(key, partition=partition) for partition, names in keys.items() for key in names]
    )
    hooks = {key: {"sleep_before_s": 1} for names in keys.values() for key in names}
    # Batches of 4 commit while later messages of the fetched 10 still wait,
    # so the revocation lands in the middle of the partition's work.
    settings = {"CONSUMER_WORKER__MAX_BATCH_SIZE": 4}

    first = deployment.start("A", hooks=hooks, settings=settings)
    await wait_for_effects(rows, {0: 3, 1: 3}, [first], timeout_s=40)
    second = deployment.start("B", hooks=hooks, settings=settings)
    await wait_for_output(second, ASSIGNED_LINE, timeout_s=40)

    sampled: list[dict[int, int | None]] = []
    deadline = time.monotonic() + 60
    while await rows.positions() != {0: 10, 1: 10}:
        assert time.monotonic() < deadline, f"positions {await rows.positions()} after 60 s"
        assert_running([first, second])
        sampled.append(await assert_kafka_not_ahead(deployment, rows, 2))
        await anyio.sleep(0.5)
    # The mirror copies positions to Kafka every second.
    deadline = time.monotonic() + 10
    while (committed := await assert_kafka_not_ahead(deployment, rows, 2)) != {0: 10, 1: 10}:
        assert time.monotonic() < deadline, f"Kafka committed offsets {committed} 10 s after the last commit"
        await anyio.sleep(0.5)

    first.terminate()
    second.terminate()
    exit_codes = [await wait_for_exit(first), await wait_for_exit(second)]
    workers = await rows.effect_workers()
    owners = {partition: {workers[key] for key in names} for partition, names in keys.items()}
    kept_by_a = [partition for partition, names in owners.items() if names == {"A"}]
    moved_to_b = [partition for partition, names in owners.items() if names == {"A", "B"}]
    invocations = await rows.invocations_per_key()

    assert exit_codes == [0, 0]
    for marker in _FAILURE_MARKERS:
        assert marker not in first.read_stderr()
    # No handler call failed, so every repeated call would come from the rebalance.
    assert lines_with(first, RETRY_LINE) == []
    assert lines_with(second, RETRY_LINE) == []
    assert await rows.effects_per_key() == {key: 1 for names in keys.values() for key in names}
    assert await rows.positions() == {0: 10, 1: 10}
    assert await deployment.kafka_committed(2) == {0: 10, 1: 10}
    assert await rows.position_totals() == {
        "applied": 20,
        "key_duplicates": 0,
        "position_duplicates": 0,
        "dead_lettered": 0,
    }
    assert len(sampled) > 3
    # A kept one partition and handed the other over to B part-way through.
    assert len(kept_by_a) == 1
    assert len(moved_to_b) == 1
    assert sum(invocations[key] for key in keys[kept_by_a[0]]) == 10
    assert sum(invocations[key] for key in keys[moved_to_b[0]]) == 10


def order_key(number: int) -> str:
    return f"u-{number:03}"


def orders_with_copies(partitions: int, unique: int, copies: int, *, seed: int) -> list[Record]:
    """Return ``unique`` orders spread over ``partitions`` plus ``copies`` orders that repeat a key.

    Each copy repeats an earlier key on another partition, later in the
    production order, like an event that an upstream service published twice.
    """
    rng = random.Random(seed)
    records = [order_record(order_key(number), partition=number % partitions) for number in range(unique)]
    for number in rng.sample(range(unique), copies):
        other_partition = (number % partitions + rng.randrange(1, partitions)) % partitions
        duplicate = order_record(order_key(number), partition=other_partition)
        records.insert(rng.randrange(number + 1, len(records) + 1), duplicate)
    return records


@pytest.mark.timeout(150)
async def test_members_joining_and_leaving_apply_each_key_once(deploy: Deploy) -> None:
    # Slow test: 50 to 60 s on the embedded broker.
    partitions, unique, copies = 4, 320, 80
    deployment, rows = await deploy(partitions)
    records = orders_with_copies(partitions, unique, copies, seed=11)
    offsets = await deployment.produce(records)
    # NOTE: end offsets come from the producer's metadata because Tansu 0.6
    # can return a wrong latest offset to ListOffsets.
    end_offsets = {partition: 0 for partition in range(partitions)}
    for record, offset in zip(records, offsets, strict=True):
        end_offsets[record.partition] = max(end_offsets[record.partition], offset + 1)
    keys = [order_key(number) for number in range(unique)]
    # 0.3 s per message keeps each partition busy for about 25 s of handler
    # time, longer than the membership changes below take.
    hooks = {key: {"sleep_before_s": 0.3} for key in keys}
    settings = {"CONSUMER_WORKER__MAX_BATCH_SIZE": 10}

    first = deployment.start("W1", hooks=hooks, settings=settings)
    await wait_for_effects(rows, {partition: 5 for partition in range(partitions)}, [first], timeout_s=40)
    second = deployment.start("W2", hooks=hooks, settings=settings)
    third = deployment.start("W3", hooks=hooks, settings=settings)
    await wait_for_writers(rows, {"W2", "W3"}, [first, second, third], timeout_s=40)

    second.terminate()
    assert await wait_for_exit(second, timeout_s=30) == 0
    await anyio.sleep(2)
    third.kill()
    assert await wait_for_exit(third) == -9
    unfinished_at_kill = sum(end_offsets.values()) - sum((await rows.positions()).values())
    # W4 is the killed worker started again, under a new name in the effect rows.
    fourth = deployment.start("W4", hooks=hooks, settings=settings)

    deadline = time.monotonic() + 90
    while await rows.positions() != end_offsets:
        assert time.monotonic() < deadline, f"positions {await rows.positions()}, expected {end_offsets}"
        assert_running([first, fourth])
        await anyio.sleep(0.5)
    alive = [first.returncode is None, fourth.returncode is None]
    first.terminate()
    fourth.terminate()
    exit_codes = [await wait_for_exit(first), await wait_for_exit(fourth)]
    totals = await rows.position_totals()

    assert len(records) == unique + copies
    assert unfinished_at_kill > 0
    assert alive == [True, True]
    assert exit_codes == [0, 0]
    assert await rows.effects_per_key() == {key: 1 for key in keys}
    assert await rows.positions() == end_offsets
    assert await rows.dead_letter_count() == 0
    assert totals["applied"] == unique
    assert totals["key_duplicates"] == copies
    assert totals["dead_lettered"] == 0
    # Every worker that was a member applied part of the messages.
    assert set((await rows.effect_workers()).values()) == {"W1", "W2", "W3", "W4"}
