"""A worker stopped while a handler runs leaves each message fully applied or not at all.

The two-step handler writes an effect row, sleeps, then writes a ledger row,
all in the batch transaction. A watcher on its own connection reads both
tables every 100 ms for the whole test and records every effect row without
its ledger row, which would be a half-applied message.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import anyio
import pytest
from aiokafka import AIOKafkaConsumer

from tests.acceptance.helpers import (
    ASSIGNED_LINE,
    HEARTBEAT_INTERVAL_S,
    SESSION_TIMEOUT_S,
    STARTED_LINE,
    TWO_STEP_HANDLER,
    Deployment,
    Rows,
    order_record,
    wait_for_exit,
    wait_for_invocation,
    wait_for_output,
    wait_for_positions,
)
from tests.support.process import WorkerProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

Deploy = Callable[[int], Awaitable[tuple[Deployment, Rows]]]

KEYS = ["k-1", "k-2", "k-3"]
ALL_ONCE = {key: 1 for key in KEYS}
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


class HalfAppliedWatcher:
    """Polls every 100 ms for effect rows without their ledger row and keeps what it saw."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.polls = 0
        self.half_applied: list[list[str]] = []

    async def run(self) -> None:
        while True:
            keys = await self.rows.effects_without_ledger()
            if keys:
                self.half_applied.append(keys)
            self.polls += 1
            await anyio.sleep(0.1)


@asynccontextmanager
async def watching(
    deploy: Deploy, *, partitions: int = 1, produce: bool = True
) -> AsyncIterator[tuple[Deployment, Rows, HalfAppliedWatcher]]:
    """Yield a deployment (with k-1 to k-3 produced to partition 0 if ``produce``), its rows, and a running watcher."""
    deployment, rows = await deploy(partitions)
    if produce:
        await deployment.produce([order_record(key) for key in KEYS])
    watcher = HalfAppliedWatcher(await Rows.open(deployment))
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(watcher.run)
            yield deployment, rows, watcher
            task_group.cancel_scope.cancel()
    finally:
        await watcher.rows.close()


async def restart_and_finish(deployment: Deployment, rows: Rows) -> WorkerProcess:
    """Restart without hooks, wait until all three messages are applied, and stop the worker."""
    worker = deployment.start("restarted", handler=TWO_STEP_HANDLER)
    await wait_for_positions(rows, {0: 3}, timeout_s=40, workers=[worker])
    worker.terminate()
    assert await wait_for_exit(worker) == 0
    return worker


async def assert_all_applied_once(rows: Rows, watcher: HalfAppliedWatcher) -> None:
    assert await rows.effects_per_key() == ALL_ONCE
    assert await rows.ledger_per_key() == ALL_ONCE
    assert await rows.positions() == {0: 3}
    assert watcher.half_applied == []
    assert watcher.polls > 20


def log_time(line: str) -> datetime:
    match = _LOG_TIME.match(line)
    assert match is not None, f"no timestamp at the start of {line!r}"
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def seconds_to_assignment(worker: WorkerProcess) -> float:
    """Return the seconds from the worker's start-up line to its first assignment line."""
    lines = worker.read_stderr().splitlines()
    started = next(line for line in lines if STARTED_LINE in line)
    assigned = next(line for line in lines if ASSIGNED_LINE in line)
    return (log_time(assigned) - log_time(started)).total_seconds()


async def join_as_placeholder(deployment: Deployment) -> AIOKafkaConsumer:
    """Join the group with a plain consumer that never commits, and return it once it has an assignment."""
    consumer = AIOKafkaConsumer(
        deployment.topic,
        bootstrap_servers=deployment.bootstrap,
        group_id=deployment.group_id,
        enable_auto_commit=False,
        session_timeout_ms=SESSION_TIMEOUT_S * 1000,
        heartbeat_interval_ms=HEARTBEAT_INTERVAL_S * 1000,
    )
    await consumer.start()
    try:
        with anyio.fail_after(30):
            while not consumer.assignment():
                await anyio.sleep(0.1)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


@pytest.mark.timeout(90)
async def test_kill_mid_handler_leaves_no_half_applied_message(deploy: Deploy) -> None:
    async with watching(deploy) as (deployment, rows, watcher):
        first = deployment.start(
            "first",
            handler=TWO_STEP_HANDLER,
            hooks={"k-2": {"sleep_between_s": 2}},
            settings={"CONSUMER_WORKER__MAX_BATCH_SIZE": 1},
        )
        await wait_for_invocation(rows, "k-2", first, timeout_s=30)
        # k-2's effect row is written; its ledger row comes after the sleep.
        await anyio.sleep(0.5)
        first.kill()
        assert await wait_for_exit(first) == -9

        assert await rows.positions() == {0: 1}
        assert await rows.effects_per_key() == {"k-1": 1}
        assert await rows.ledger_per_key() == {"k-1": 1}

        await restart_and_finish(deployment, rows)
        await assert_all_applied_once(rows, watcher)


@pytest.mark.timeout(90)
async def test_sigterm_within_grace_finishes_and_leaves_group(deploy: Deploy, kafka_is_tansu: bool) -> None:
    # With two partitions the worker gets one even while the placeholder below
    # is still a member. All messages go to partition 0.
    async with watching(deploy, partitions=2, produce=False) as (deployment, rows, watcher):
        placeholder = None
        if kafka_is_tansu:
            # NOTE: Tansu 0.6 numbers the first generation of a group 0, and
            # aiokafka 0.14 sends LeaveGroup only for a generation above 0, so
            # a worker that joined an empty group never leaves it on Tansu. A
            # placeholder member that joins first and leaves later puts the
            # worker in generation 2, where LeaveGroup is sent as on Kafka.
            placeholder = await join_as_placeholder(deployment)
        try:
            first = deployment.start(
                "first",
                handler=TWO_STEP_HANDLER,
                hooks={"k-2": {"sleep_between_s": 4}},
                settings={"CONSUMER_WORKER__MAX_BATCH_SIZE": 1, "CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S": 10},
            )
            await wait_for_output(first, ASSIGNED_LINE, timeout_s=30)
        finally:
            if placeholder is not None:
                await placeholder.stop()
        if placeholder is not None:
            # The worker gets both partitions once the placeholder has left.
            await wait_for_output(first, ASSIGNED_LINE, count=2, timeout_s=30)
        await deployment.produce([order_record(key) for key in KEYS])

        await wait_for_invocation(rows, "k-2", first, timeout_s=30)
        await anyio.sleep(0.5)
        first.terminate()
        stopped_at = time.monotonic()
        assert await wait_for_exit(first, timeout_s=15) == 0
        exit_after_s = time.monotonic() - stopped_at

        # k-2 finished within the grace period; k-3 was not started.
        assert exit_after_s < 10
        assert await rows.positions() == {0: 2}
        assert await rows.effects_per_key() == {"k-1": 1, "k-2": 1}
        assert await rows.ledger_per_key() == {"k-1": 1, "k-2": 1}
        assert "k-3" not in await rows.invocations_per_key()
        assert "LeaveGroup request failed" not in first.read_stderr()

        restarted = await restart_and_finish(deployment, rows)
        await assert_all_applied_once(rows, watcher)
        # A member that left is removed at once, so the next one is assigned
        # without waiting for the old member's session to time out.
        assert seconds_to_assignment(restarted) < SESSION_TIMEOUT_S - HEARTBEAT_INTERVAL_S


@pytest.mark.timeout(90)
async def test_sigterm_past_grace_rolls_back_message(deploy: Deploy) -> None:
    async with watching(deploy) as (deployment, rows, watcher):
        first = deployment.start(
            "first",
            handler=TWO_STEP_HANDLER,
            hooks={"k-2": {"sleep_between_s": 5}},
            settings={"CONSUMER_WORKER__MAX_BATCH_SIZE": 1, "CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S": 1},
        )
        await wait_for_invocation(rows, "k-2", first, timeout_s=30)
        await anyio.sleep(0.2)
        first.terminate()
        stopped_at = time.monotonic()
        assert await wait_for_exit(first, timeout_s=15) == 0
        exit_after_s = time.monotonic() - stopped_at

        assert exit_after_s < 3
        assert await rows.positions() == {0: 1}
        assert await rows.effects_per_key() == {"k-1": 1}
        assert await rows.ledger_per_key() == {"k-1": 1}
        assert await rows.idle_in_transaction_backends() == []

        await restart_and_finish(deployment, rows)
        await assert_all_applied_once(rows, watcher)
        assert (await rows.invocations_per_key())["k-2"] == 2


@pytest.mark.timeout(90)
async def test_sigterm_past_grace_rolls_back_whole_batch(deploy: Deploy) -> None:
    async with watching(deploy) as (deployment, rows, watcher):
        # The default batch size puts k-1 to k-3 in one transaction.
        first = deployment.start(
            "first",
            handler=TWO_STEP_HANDLER,
            hooks={"k-2": {"sleep_between_s": 5}},
            settings={"CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S": 1},
        )
        await wait_for_invocation(rows, "k-2", first, timeout_s=30)
        await anyio.sleep(0.2)
        first.terminate()
        assert await wait_for_exit(first, timeout_s=15) == 0

        effects = await rows.effects_per_key()
        ledger = await rows.ledger_per_key()
        position = (await rows.positions()).get(0, 0)
        assert effects == ledger
        assert ("k-1" in effects) == ("k-2" in effects)
        assert position == len(effects)
        assert await rows.idle_in_transaction_backends() == []

        await restart_and_finish(deployment, rows)
        await assert_all_applied_once(rows, watcher)
