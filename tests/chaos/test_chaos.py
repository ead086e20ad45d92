"""A short seeded chaos run: every message is applied once despite kills, zombies, lost connections and a replay.

The run takes 60 to 80 s: a 45 s fault window with 1,500 logical messages
published over its first 36 s, then the drain. ``CONSUMER_TEST_CHAOS_SEED``
replaces the seed, to repeat a failing run or to try others.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos import driver

pytestmark = [pytest.mark.chaos, pytest.mark.anyio]

SEED_VAR = "CONSUMER_TEST_CHAOS_SEED"

PROCESS_FAULTS = ("sigkill", "zombie", "pg_terminate", "join_leave")
HANDLER_FAULTS = ("handler_transient", "handler_permanent", "handler_sleep")


def short_run() -> driver.ChaosConfig:
    return driver.ChaosConfig(
        seed=int(os.environ.get(SEED_VAR, "7")),
        duration_s=45.0,
        messages=1500,
        mean_fault_interval_s=1.5,
        replays=1,
        drain_timeout_s=90.0,
    )


@pytest.mark.timeout(300)
async def test_short_run_applies_each_message_once(
    kafka_bootstrap: str, database_url: str, topic_factory: Callable[..., str]
) -> None:
    config = short_run()
    topic = topic_factory(config.partitions, prefix="chaos")
    # Outside pytest's own temporary folders, which keep only the last few
    # sessions: the logs of a failed run stay until someone deletes them.
    log_dir = Path(tempfile.mkdtemp(prefix=f"chaos-{config.seed}-"))

    report = await driver.run(
        config, bootstrap=kafka_bootstrap, database_url=database_url, topic=topic, log_dir=log_dir
    )
    print(report.table())
    if not report.violations:
        shutil.rmtree(log_dir)

    # The run must have injected every kind of fault, or a pass would mean little.
    for kind in (*PROCESS_FAULTS, *HANDLER_FAULTS):
        assert report.faults[kind] + report.handler_faults[kind] > 0, f"no {kind} fault injected\n{report.table()}"
    assert report.faults["replay"] == 1, report.table()
    assert report.drain_s is not None, report.table()
    assert not report.violations, report.table()
