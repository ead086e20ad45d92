"""The Kafka offset is committed only after the batch transaction, and a committed batch is never applied again.

Each test stops a ``consumer run`` subprocess at one point of the durability
order (handler running, database committed but Kafka not yet) and then
restarts it, checking effects, stored positions and Kafka's committed offset.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from tests.acceptance.helpers import (
    STARTED_LINE,
    STOPPED_LINE,
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

# k-1 sleeps this long in its handler, with the batch transaction open.
SLOW_HANDLER_S = 12
# Seconds after the worker's start at which it is stopped. That covers the
# group join (about 3 s) and several runs of the 1 s Kafka commit mirror,
# and is still well inside k-1's sleep.
STOP_AT_S = 8


async def wait_for_kafka_committed(deployment: Deployment, expected: int, *, timeout_s: float = 10.0) -> None:
    started = time.monotonic()
    while (committed := await deployment.kafka_committed(1)) != {0: expected}:
        if time.monotonic() - started >= timeout_s:
            raise AssertionError(f"Kafka committed offsets {committed}, expected {{0: {expected}}}")
        await anyio.sleep(0.5)


async def stop_inside_slow_handler(
    deployment: Deployment,
    rows: Rows,
    stop: Callable[[WorkerProcess], None],
    settings: dict[str, object] | None = None,
) -> int:
    """Start a worker whose k-1 handler sleeps, run ``stop`` on it at ``STOP_AT_S``, and return its exit code."""
    await deployment.produce([order_record("k-1"), order_record("k-2")])
    started = time.monotonic()
    worker = deployment.start("first", hooks={"k-1": {"sleep_before_s": SLOW_HANDLER_S}}, settings=settings)

    await wait_for_invocation(rows, "k-1", worker, timeout_s=STOP_AT_S)
    await anyio.sleep(max(STOP_AT_S - (time.monotonic() - started), 0.0))
    stop(worker)
    exit_code = await wait_for_exit(worker, timeout_s=15)

    startup = worker.read_stderr()
    assert "enable_auto_commit=False" in startup
    assert "auto_offset_reset=earliest" in startup
    return exit_code


async def assert_nothing_applied(deployment: Deployment, rows: Rows) -> None:
    assert (await deployment.kafka_committed(1))[0] in (None, 0)
    assert (await rows.positions()).get(0, 0) == 0
    assert await rows.effect_count() == 0
    assert await rows.inbox_count() == 0
    assert await rows.invocations_per_key() == {"k-1": 1}


async def restart_and_finish(deployment: Deployment, rows: Rows) -> None:
    """Restart without the slow hook and check that both messages end up applied once."""
    worker = deployment.start("restarted")
    await wait_for_positions(rows, {0: 2}, timeout_s=30, workers=[worker])
    await wait_for_kafka_committed(deployment, 2)

    assert await rows.effects_per_key() == {"k-1": 1, "k-2": 1}
    assert await rows.position_totals() == {
        "applied": 2,
        "key_duplicates": 0,
        "position_duplicates": 0,
        "dead_lettered": 0,
    }
    assert await rows.idle_in_transaction_backends() == []

    worker.terminate()
    assert await wait_for_exit(worker, timeout_s=15) == 0


@pytest.mark.timeout(90)
async def test_offset_not_committed_before_effect_is_durable(deploy: Deploy) -> None:
    deployment, rows = await deploy(1)

    exit_code = await stop_inside_slow_handler(deployment, rows, lambda worker: worker.kill())

    assert exit_code == -9
    await assert_nothing_applied(deployment, rows)
    await restart_and_finish(deployment, rows)


@pytest.mark.timeout(90)
async def test_sigterm_past_shutdown_timeout_commits_nothing(deploy: Deploy) -> None:
    deployment, rows = await deploy(1)
    shutdown_timeout_s = 2
    stopped_at = 0.0

    def terminate(worker: WorkerProcess) -> None:
        nonlocal stopped_at
        stopped_at = time.monotonic()
        worker.terminate()

    exit_code = await stop_inside_slow_handler(
        deployment, rows, terminate, {"CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S": shutdown_timeout_s}
    )
    exit_after_s = time.monotonic() - stopped_at

    assert exit_code == 0
    # The worker waits out the shutdown timeout and then rolls k-1 back.
    # Leaving the group and closing the pool took about 10 ms more in runs
    # against the embedded broker.
    assert exit_after_s < shutdown_timeout_s + 3
    assert await rows.idle_in_transaction_backends() == []
    await assert_nothing_applied(deployment, rows)
    await restart_and_finish(deployment, rows)


@pytest.mark.timeout(90)
async def test_kill_after_database_commit_applies_nothing_again(deploy: Deploy) -> None:
    deployment, rows = await deploy(1)
    keys = [f"k-{number}" for number in range(1, 6)]
    await deployment.produce([order_record(key) for key in keys])
    # The Kafka mirror runs only at shutdown or once an hour, so the kill
    # lands after the database commit and before any Kafka commit.
    settings = {"CONSUMER_WORKER__KAFKA_COMMIT_INTERVAL_S": 3600}

    first = deployment.start("first", settings=settings)
    await wait_for_positions(rows, {0: 5}, timeout_s=30, workers=[first])
    first.kill()
    assert await wait_for_exit(first) == -9
    assert await deployment.kafka_committed(1) == {0: None}

    restarted = deployment.start("restarted", settings=settings)
    await wait_for_output(restarted, "partitions assigned:", timeout_s=30)
    # A message after the old ones: once it is applied, any redelivery of
    # offsets 0 to 4 would have been handled before it.
    await deployment.produce([order_record("k-6")])
    await wait_for_positions(rows, {0: 6}, timeout_s=30, workers=[restarted])
    restarted.terminate()
    assert await wait_for_exit(restarted) == 0

    assert await rows.effects_per_key() == {key: 1 for key in [*keys, "k-6"]}
    assert await rows.invocations_per_key() == {key: 1 for key in [*keys, "k-6"]}
    assert await rows.position_totals() == {
        "applied": 6,
        "key_duplicates": 0,
        "position_duplicates": 0,
        "dead_lettered": 0,
    }
    assert await rows.effect_workers() == {**{key: "first" for key in keys}, "k-6": "restarted"}
    summary = [line for line in restarted.read_stderr().splitlines() if STOPPED_LINE in line]
    assert len(summary) == 1
    assert " applied=1 " in summary[0]
    assert STARTED_LINE in restarted.read_stderr()
    # The shutdown mirrors the stored position to Kafka.
    assert await deployment.kafka_committed(1) == {0: 6}
