"""Helpers of the failure tests: records with faults, the ``consumer`` CLI as a subprocess, and row readers.

Workers run in-process through `tests.integration.helpers.running_worker`.
The CLI runs as ``python -m consumer``, so its exit codes and output are the
ones an operator gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import asyncpg

from tests.failures import handlers as failure_handlers
from tests.integration.helpers import Rows
from tests.support import kafka
from tests.support.process import REPO_ROOT

__all__ = ["CliResult", "FailureRows", "handler_path", "order_value", "record", "run_cli", "sample"]


def order_value(order_id: str, amount: int = 1) -> bytes:
    """Return the JSON value of a valid order."""
    return json.dumps({"order_id": order_id, "amount": amount}).encode()


def record(
    key: str,
    *,
    kafka_key: bytes | None = None,
    partition: int = 0,
    amount: int = 1,
    value: bytes | None = None,
    headers: Sequence[tuple[str, bytes | None]] = (),
    fault: str | None = None,
    fault_times: int | None = None,
    sleep_s: float | None = None,
    tombstone: bool = False,
) -> kafka.Record:
    """Build a record whose ``Idempotency-Key`` header is `key`.

    The value defaults to a valid order with id `key`, and `tombstone` makes
    it null. The Kafka key defaults to `key` as UTF-8. `fault`, `fault_times` and
    `sleep_s` set the headers `failure_handlers.FaultyOrderHandler` reads,
    after `headers`.
    """
    if tombstone:
        value = None
    elif value is None:
        value = order_value(key, amount)
    all_headers: list[tuple[str, bytes | None]] = [("Idempotency-Key", key.encode()), *headers]
    if fault is not None:
        all_headers.append((failure_handlers.FAULT_HEADER, fault.encode()))
    if fault_times is not None:
        all_headers.append((failure_handlers.FAULT_TIMES_HEADER, str(fault_times).encode()))
    if sleep_s is not None:
        all_headers.append((failure_handlers.SLEEP_HEADER, str(sleep_s).encode()))
    return kafka.Record(
        partition=partition,
        key=kafka_key if kafka_key is not None else key.encode(),
        value=value,
        headers=all_headers,
    )


def handler_path(handler_class: type) -> str:
    """Return ``module:Class`` of a handler class, as the CLI takes it."""
    return f"{handler_class.__module__}:{handler_class.__qualname__}"


@dataclass(frozen=True)
class CliResult:
    """Exit code and output of one ``consumer`` command."""

    args: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """Parse stdout as JSON."""
        return json.loads(self.stdout)

    def __str__(self) -> str:
        command = " ".join(self.args)
        return f"consumer {command} exited {self.exit_code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


async def run_cli(database_url: str, *args: str, fixed: bool = False, timeout_s: float = 60.0) -> CliResult:
    """Run ``python -m consumer *args`` against `database_url` and return its exit code and output.

    The child gets no ``CONSUMER_*`` variable from this process besides the
    database URL, and `fixed` sets the variable that fixes the failure test
    handlers. Standard input is /dev/null, as in a job without a terminal.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONSUMER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["CONSUMER_POSTGRES__DSN"] = database_url
    if fixed:
        env[failure_handlers.FIXED_VAR] = "1"
    with anyio.fail_after(timeout_s):
        completed = await anyio.run_process(
            [sys.executable, "-m", "consumer", *args],
            stdin=subprocess.DEVNULL,
            check=False,
            cwd=REPO_ROOT,
            env=env,
        )
    return CliResult(
        args=args,
        exit_code=completed.returncode,
        stdout=completed.stdout.decode(errors="replace"),
        stderr=completed.stderr.decode(errors="replace"),
    )


class FailureRows(Rows):
    """`Rows` plus the readers the failure tests need: call times, dead letters by offset, parked keys."""

    @classmethod
    async def open(cls, database_url: str) -> FailureRows:
        return cls(await asyncpg.connect(database_url))

    async def call_times(self, key: str) -> list[datetime]:
        """Return when the test handler was called for `key`, in call order, rolled-back calls included."""
        rows = await self.connection.fetch(
            "SELECT called_at FROM test_app.invocations WHERE idem_key = $1 ORDER BY called_at", key
        )
        return [row["called_at"] for row in rows]

    async def effects_per_key(self) -> dict[str, int]:
        rows = await self.connection.fetch("SELECT idem_key, count(*) AS n FROM test_app.effects GROUP BY idem_key")
        return {row["idem_key"]: row["n"] for row in rows}

    async def letters_by_offset(self, topic: str, partition: int = 0) -> dict[int, asyncpg.Record]:
        """Return the dead letters of one partition, keyed by offset."""
        rows = await self.connection.fetch(
            "SELECT *, xmin::text::bigint AS xid FROM consumer.dead_letters WHERE topic = $1 AND partition = $2",
            topic,
            partition,
        )
        return {row["offset"]: row for row in rows}

    async def letter_ids(self, topic: str) -> dict[int, int]:
        """Map each offset of `topic` partition 0 that has a dead letter to its id."""
        return {offset: row["id"] for offset, row in (await self.letters_by_offset(topic)).items()}

    async def parked_keys(self) -> list[asyncpg.Record]:
        parked: list[asyncpg.Record] = await self.connection.fetch(
            "SELECT * FROM consumer.parked_keys ORDER BY topic, key"
        )
        return parked

    async def clock(self) -> datetime:
        """Return the database server's current time, to filter dead letters by creation time."""
        now: datetime = await self.connection.fetchval("SELECT clock_timestamp()")
        return now

    async def close(self) -> None:
        await self.connection.close()


def sample(registry: Any, name: str, labels: Mapping[str, str]) -> float:
    """Return the value of one metric sample, 0 when the labelled series was never touched."""
    value = registry.get_sample_value(name, dict(labels))
    return float(value) if value is not None else 0.0
