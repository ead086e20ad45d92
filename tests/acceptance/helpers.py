"""Helpers of the acceptance tests: produce orders, start ``consumer run`` workers, read the rows they wrote.

Every test gets a fresh topic, a fresh consumer group and a fresh database,
so the numbers a test asserts count only its own messages.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from tests.support import kafka
from tests.support.process import WorkerProcess

__all__ = [
    "ASSIGNED_LINE",
    "HEARTBEAT_INTERVAL_S",
    "ORDER_HANDLER",
    "RETRY_LINE",
    "REVOKED_LINE",
    "SESSION_TIMEOUT_S",
    "STARTED_LINE",
    "STOPPED_LINE",
    "TWO_STEP_HANDLER",
    "Deployment",
    "Rows",
    "assert_running",
    "lines_with",
    "order_record",
    "wait_for_exit",
    "wait_for_invocation",
    "wait_for_output",
    "wait_for_positions",
]

ORDER_HANDLER = "tests.support.handlers:OrderHandler"
TWO_STEP_HANDLER = "tests.support.handlers:TwoStepHandler"

# Log lines of the worker that the tests wait for or count.
STARTED_LINE = "worker started:"
ASSIGNED_LINE = "partitions assigned:"
REVOKED_LINE = "partitions revoked:"
STOPPED_LINE = "worker stopped:"
RETRY_LINE = "handler failed on attempt"

# The broker's group timing used by every worker unless a test overrides it.
# A session timeout of 6 s is the smallest one Kafka accepts by default
# (group.min.session.timeout.ms), so a killed member is evicted quickly.
SESSION_TIMEOUT_S = 6
HEARTBEAT_INTERVAL_S = 1


def order_record(key: str, *, partition: int = 0, amount: int = 1) -> kafka.Record:
    """Build an order message whose ``Idempotency-Key`` header is ``key``."""
    payload = {"order_id": f"order-{key}", "amount": amount}
    return kafka.Record(
        partition=partition,
        key=key.encode(),
        value=json.dumps(payload).encode(),
        headers=[("Idempotency-Key", key.encode())],
    )


@dataclass
class Deployment:
    """One topic, one consumer group and one database, and the workers started against them."""

    bootstrap: str
    topic: str
    database_url: str
    start_process: Callable[..., WorkerProcess]
    log_dir: Path
    group_id: str = field(default_factory=lambda: f"acceptance-{uuid.uuid4().hex[:10]}")

    def env(
        self, *, name: str = "", hooks: Mapping[str, Any] | None = None, settings: Mapping[str, object] | None = None
    ) -> dict[str, str]:
        """Return the environment of a worker, with ``settings`` mapping further ``CONSUMER_*`` variables to values."""
        env = {
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "CONSUMER_KAFKA__TOPICS": self.topic,
            "CONSUMER_KAFKA__GROUP_ID": self.group_id,
            "CONSUMER_POSTGRES__DSN": self.database_url,
            "CONSUMER_KAFKA__SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
            "CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
            "CONSUMER_TEST_HOOKS": json.dumps(dict(hooks or {})),
        }
        if name:
            env["CONSUMER_TEST_WORKER"] = name
        env.update({variable: str(value) for variable, value in (settings or {}).items()})
        return env

    def start(
        self,
        name: str,
        *,
        handler: str = ORDER_HANDLER,
        hooks: Mapping[str, Any] | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> WorkerProcess:
        """Start ``python -m consumer run handler`` as a worker named ``name`` in the effect rows."""
        return self.start_process(handler, env=self.env(name=name, hooks=hooks, settings=settings))

    async def migrate(self) -> None:
        """Apply the framework's and the test handlers' migrations with ``consumer migrate``."""
        command = [sys.executable, "-m", "consumer", "migrate", "--handler", ORDER_HANDLER]
        env = {"CONSUMER_POSTGRES__DSN": self.database_url}
        with WorkerProcess(command, log_dir=self.log_dir / "migrate", env=env) as process:
            exit_code = await wait_for_exit(process, timeout_s=60)
            assert exit_code == 0, f"consumer migrate failed with exit code {exit_code}\n{process.output_tail()}"

    async def produce(self, records: Iterable[kafka.Record]) -> list[int]:
        """Produce ``records`` in order and return their offsets."""
        return await kafka.produce(self.bootstrap, self.topic, records)

    async def kafka_committed(self, partitions: int | Iterable[int] = 1) -> dict[int, int | None]:
        """Return the group's committed Kafka offset of each partition, None where nothing is committed."""
        return await kafka.fetch_committed(self.bootstrap, self.group_id, self.topic, partitions)


class Rows:
    """Reads the framework's and the test handlers' tables over one connection of the test."""

    def __init__(self, connection: asyncpg.Connection, deployment: Deployment) -> None:
        self.connection = connection
        self.deployment = deployment

    @classmethod
    async def open(cls, deployment: Deployment) -> Rows:
        return cls(await asyncpg.connect(deployment.database_url), deployment)

    async def close(self) -> None:
        await self.connection.close()

    async def effects_per_key(self) -> dict[str, int]:
        rows = await self.connection.fetch("SELECT idem_key, count(*) AS n FROM test_app.effects GROUP BY idem_key")
        return {row["idem_key"]: row["n"] for row in rows}

    async def effect_count(self) -> int:
        count: int = await self.connection.fetchval("SELECT count(*) FROM test_app.effects")
        return count

    async def effect_workers(self) -> dict[str, str]:
        """Map each key to the worker that wrote its effect (the last one, if written twice)."""
        rows = await self.connection.fetch("SELECT idem_key, worker FROM test_app.effects ORDER BY seq")
        return {row["idem_key"]: row["worker"] for row in rows}

    async def effects_per_partition(self) -> dict[int, int]:
        rows = await self.connection.fetch("SELECT partition, count(*) AS n FROM test_app.effects GROUP BY partition")
        return {row["partition"]: row["n"] for row in rows}

    async def ledger_per_key(self) -> dict[str, int]:
        rows = await self.connection.fetch("SELECT idem_key, count(*) AS n FROM test_app.ledger GROUP BY idem_key")
        return {row["idem_key"]: row["n"] for row in rows}

    async def effects_without_ledger(self) -> list[str]:
        """Return keys whose effect row is visible without its ledger row: a half-applied message."""
        rows = await self.connection.fetch(
            "SELECT e.idem_key FROM test_app.effects AS e"
            " WHERE NOT EXISTS (SELECT FROM test_app.ledger AS l WHERE l.idem_key = e.idem_key)"
        )
        return [row["idem_key"] for row in rows]

    async def invocations_per_key(self) -> dict[str, int]:
        rows = await self.connection.fetch("SELECT idem_key, count(*) AS n FROM test_app.invocations GROUP BY idem_key")
        return {row["idem_key"]: row["n"] for row in rows}

    async def positions(self) -> dict[int, int]:
        """Map each partition of the topic to its stored next offset; a partition without a row is absent."""
        rows = await self.connection.fetch(
            "SELECT partition, next_offset FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2",
            self.deployment.group_id,
            self.deployment.topic,
        )
        return {row["partition"]: row["next_offset"] for row in rows}

    async def position_totals(self) -> dict[str, int]:
        """Sum the running counters of the positions table over all partitions."""
        row = await self.connection.fetchrow(
            "SELECT coalesce(sum(applied), 0) AS applied,"
            " coalesce(sum(key_duplicates), 0) AS key_duplicates,"
            " coalesce(sum(position_duplicates), 0) AS position_duplicates,"
            " coalesce(sum(dead_lettered), 0) AS dead_lettered"
            " FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2",
            self.deployment.group_id,
            self.deployment.topic,
        )
        assert row is not None
        return {name: int(value) for name, value in row.items()}

    async def dead_letter_count(self) -> int:
        count: int = await self.connection.fetchval("SELECT count(*) FROM consumer.dead_letters")
        return count

    async def idle_in_transaction_backends(self) -> list[int]:
        """Return the PIDs of the workers' sessions that sit idle inside an open transaction."""
        rows = await self.connection.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'consumer'"
            " AND state LIKE 'idle in transaction%'"
        )
        return [row["pid"] for row in rows]

    async def inbox_count(self) -> int:
        count: int = await self.connection.fetchval(
            "SELECT count(*) FROM consumer.inbox WHERE dedup_scope = $1", self.deployment.group_id
        )
        return count


def lines_with(process: WorkerProcess, text: str) -> list[str]:
    """Return the lines of the worker's stderr that contain ``text``."""
    return [line for line in process.read_stderr().splitlines() if text in line]


async def wait_for_output(
    process: WorkerProcess, text: str, *, timeout_s: float = 30.0, count: int = 1, stream: str = "all"
) -> float:
    """Wait until ``text`` appears ``count`` times in the output and return the seconds waited.

    Unlike `WorkerProcess.wait_for_output` it sleeps on the event loop, so
    tasks running beside the test keep running. Raises AssertionError with
    the end of the output on timeout or when the process exits first.
    """
    started = time.monotonic()
    while True:
        output = process.read_stderr() if stream == "stderr" else process.output()
        if output.count(text) >= count:
            return time.monotonic() - started
        if process.returncode is not None:
            raise AssertionError(
                f"process exited with code {process.returncode} before writing {text!r} {count} time(s)\n"
                f"{process.output_tail()}"
            )
        if time.monotonic() - started >= timeout_s:
            raise AssertionError(f"{text!r} not written {count} time(s) within {timeout_s} s\n{process.output_tail()}")
        await anyio.sleep(0.05)


def assert_running(workers: Iterable[WorkerProcess]) -> None:
    """Raise AssertionError with the end of its output when one of ``workers`` has exited."""
    for worker in workers:
        if worker.returncode is not None:
            raise AssertionError(f"worker exited with code {worker.returncode}\n{worker.output_tail()}")


async def wait_for_positions(
    rows: Rows, expected: Mapping[int, int], *, timeout_s: float, workers: Iterable[WorkerProcess] = ()
) -> float:
    """Wait until the stored positions equal ``expected`` and return the seconds waited.

    Fails at once when one of ``workers`` exits meanwhile.
    """
    workers = list(workers)
    started = time.monotonic()
    while True:
        positions = await rows.positions()
        if positions == expected:
            return time.monotonic() - started
        assert_running(workers)
        if time.monotonic() - started >= timeout_s:
            raise AssertionError(f"positions {positions}, expected {dict(expected)} within {timeout_s} s")
        await anyio.sleep(0.1)


async def wait_for_invocation(rows: Rows, key: str, worker: WorkerProcess, *, timeout_s: float = 30.0) -> float:
    """Wait until ``worker`` has called the handler for ``key`` and return the seconds waited."""
    started = time.monotonic()
    while (await rows.invocations_per_key()).get(key, 0) == 0:
        assert_running([worker])
        if time.monotonic() - started >= timeout_s:
            raise AssertionError(f"handler not called for {key!r} within {timeout_s} s\n{worker.output_tail()}")
        await anyio.sleep(0.05)
    return time.monotonic() - started


async def wait_for_exit(process: WorkerProcess, *, timeout_s: float = 30.0) -> int:
    """Wait for ``process`` to exit without blocking the event loop and return its exit code."""
    return await anyio.to_thread.run_sync(lambda: process.wait(timeout_s=timeout_s))
