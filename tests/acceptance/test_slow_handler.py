"""A handler slower than ``max_poll_interval`` neither evicts its worker from the group nor runs twice.

The worker keeps polling while a partition's handler runs, so the member
stays in the group. k-2 sleeps 15 s with a poll interval limit of 10 s and a
session timeout of 6 s.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from tests.acceptance.helpers import (
    ASSIGNED_LINE,
    REVOKED_LINE,
    Deployment,
    Rows,
    order_record,
    wait_for_exit,
    wait_for_positions,
)

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

Deploy = Callable[[int], Awaitable[tuple[Deployment, Rows]]]

KEYS = ["k-1", "k-2", "k-3"]
SLOW_HOOK = {"k-2": {"sleep_before_s": 15}}
MAX_POLL_INTERVAL_S = 10


@pytest.mark.timeout(90)
async def test_slow_handler_keeps_group_membership(deploy: Deploy) -> None:
    deployment, rows = await deploy(1)
    await deployment.produce([order_record(key) for key in KEYS])

    worker = deployment.start(
        "only", hooks=SLOW_HOOK, settings={"CONSUMER_KAFKA__MAX_POLL_INTERVAL_S": MAX_POLL_INTERVAL_S}
    )
    await wait_for_positions(rows, {0: 3}, timeout_s=60, workers=[worker])
    log_before_stop = worker.read_stderr()
    worker.terminate()
    exit_code = await wait_for_exit(worker)

    assert exit_code == 0
    assert await rows.effects_per_key() == {key: 1 for key in KEYS}
    assert await rows.invocations_per_key() == {key: 1 for key in KEYS}
    assert await rows.positions() == {0: 3}
    assert await rows.dead_letter_count() == 0
    # An evicted member rejoins through a rebalance, which revokes and
    # assigns its partitions again.
    assert log_before_stop.count(ASSIGNED_LINE) == 1
    assert REVOKED_LINE not in log_before_stop


@pytest.mark.timeout(120)
async def test_slow_handler_with_two_members_applies_once(deploy: Deploy) -> None:
    deployment, rows = await deploy(1)
    await deployment.produce([order_record(key) for key in KEYS])
    settings = {"CONSUMER_KAFKA__MAX_POLL_INTERVAL_S": MAX_POLL_INTERVAL_S}

    started = time.monotonic()
    workers = [deployment.start(name, hooks=SLOW_HOOK, settings=settings) for name in ("A", "B")]
    await wait_for_positions(rows, {0: 3}, timeout_s=90, workers=workers)
    finished_after_s = time.monotonic() - started
    alive = [worker.returncode is None for worker in workers]
    for worker in workers:
        worker.terminate()
    exit_codes = [await wait_for_exit(worker) for worker in workers]

    assert finished_after_s < 90
    assert alive == [True, True]
    assert exit_codes == [0, 0]
    assert await rows.effects_per_key() == {key: 1 for key in KEYS}
    assert await rows.effect_count() == 3
    assert await rows.positions() == {0: 3}
    assert await rows.dead_letter_count() == 0
    # A rebalance while k-2 sleeps may cancel and roll back its first call.
    assert 1 <= (await rows.invocations_per_key())["k-2"] <= 2
