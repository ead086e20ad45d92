"""Helpers of the replay tests: a topic, group and database, the ``consumer`` commands, and row readers.

Workers run as ``consumer run`` subprocesses, except where a test reads a
worker's metrics, which only exist inside its process. The replay and prune
commands always run as subprocesses with standard input closed, so they see
no terminal and ask for no confirmation.

NOTE: every record is produced in a request of its own (`kafka.produce`),
because Tansu 0.6 reported a wrong latest offset (ListOffsets) after
multi-record batches, and the replay plan reads the end of its range from
ListOffsets.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support import kafka
from tests.support.process import WorkerProcess

__all__ = [
    "ORDER_HANDLER",
    "CommandResult",
    "Rows",
    "Stack",
    "commit_kafka_offsets",
    "order_record",
    "records_with_action",
    "wait_for_output",
    "wait_for_skipped",
    "wait_until",
]

ORDER_HANDLER = "tests.support.handlers:OrderHandler"

# A session timeout of 6 s is the smallest one Kafka accepts by default
# (group.min.session.timeout.ms), and Tansu 0.6 responds to a group's first
# JoinGroup only after half of it.
SESSION_TIMEOUT_S = 6
HEARTBEAT_INTERVAL_S = 1

ASSIGNED_LINE = "partitions assigned:"


def order_record(key: str, *, partition: int = 0, amount: int = 1, keyed: bool = True) -> kafka.Record:
    """Build an order. With `keyed` False it has no Idempotency-Key header and is deduplicated by position only."""
    value = json.dumps({"order_id": f"order-{key}", "amount": amount}).encode()
    if not keyed:
        return kafka.Record(partition=partition, key=key.encode(), value=value)
    return kafka.Record(partition=partition, key=key.encode(), value=value, headers=[("Idempotency-Key", key.encode())])


@dataclass(frozen=True)
class CommandResult:
    """Exit code and output of one ``consumer`` command."""

    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """Parse stdout, as printed with ``--json``."""
        return json.loads(self.stdout)


@dataclass
class Stack:
    """One topic, one consumer group and one migrated database, and the commands run against them."""

    bootstrap: str
    topic: str
    database_url: str
    log_dir: Path
    start_process: Callable[..., WorkerProcess]
    handler: str = ORDER_HANDLER
    group_id: str = field(default_factory=lambda: f"replay-{uuid.uuid4().hex[:10]}")
    _commands: int = 0

    def env(self, *, group_id: str | None = None, **settings: object) -> dict[str, str]:
        """Return the environment of a command, with `settings` named like the variables without the prefix.

        For example ``worker__inbox_retention_s=2`` sets ``CONSUMER_WORKER__INBOX_RETENTION_S=2``.
        """
        env = {
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "CONSUMER_KAFKA__TOPICS": self.topic,
            "CONSUMER_KAFKA__GROUP_ID": group_id or self.group_id,
            "CONSUMER_POSTGRES__DSN": self.database_url,
            "CONSUMER_KAFKA__SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
            "CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
            "CONSUMER_LOG__FORMAT": "json",
        }
        for setting, value in settings.items():
            env[f"CONSUMER_{setting.upper()}"] = str(value)
        return env

    def start(self, *, group_id: str | None = None, **settings: object) -> WorkerProcess:
        """Start ``consumer run`` with the stack's handler."""
        return self.start_process(self.handler, env=self.env(group_id=group_id, **settings))

    async def started(self, *, group_id: str | None = None, **settings: object) -> WorkerProcess:
        """Start a worker and wait until the group has assigned it its partitions."""
        worker = self.start(group_id=group_id, **settings)
        await wait_for_output(worker, ASSIGNED_LINE, timeout_s=60)
        return worker

    async def stop(self, worker: WorkerProcess) -> None:
        """Stop `worker` with SIGTERM and check that it exits cleanly."""
        worker.terminate()
        exit_code = await anyio.to_thread.run_sync(lambda: worker.wait(timeout_s=60))
        assert exit_code == 0, f"worker exited with {exit_code}\n{worker.output_tail()}"

    async def command(self, *args: str, group_id: str | None = None, **settings: object) -> CommandResult:
        """Run ``python -m consumer *args`` to its end, with standard input closed."""
        self._commands += 1
        log_dir = self.log_dir / f"command-{self._commands}"
        process = WorkerProcess(
            [sys.executable, "-m", "consumer", *args], log_dir=log_dir, env=self.env(group_id=group_id, **settings)
        )
        with process:
            exit_code = await anyio.to_thread.run_sync(lambda: process.wait(timeout_s=180))
            return CommandResult(exit_code, process.read_stdout(), process.read_stderr())

    async def replay(self, *args: str, group_id: str | None = None, **settings: object) -> CommandResult:
        """Run ``consumer replay HANDLER --topic TOPIC *args``."""
        return await self.command("replay", self.handler, "--topic", self.topic, *args, group_id=group_id, **settings)

    async def plan(self, *args: str, group_id: str | None = None, **settings: object) -> list[dict[str, Any]]:
        """Run ``consumer replay ... --dry-run --json *args`` and return its partitions, by partition number."""
        result = await self.replay("--dry-run", "--json", *args, group_id=group_id, **settings)
        assert result.exit_code == 0, f"dry run failed with {result.exit_code}: {result.stderr}"
        report = result.json()
        assert report["dry_run"] is True
        partitions: list[dict[str, Any]] = sorted(report["partitions"], key=lambda p: p["partition"])
        return partitions

    async def migrate(self) -> None:
        """Apply the framework's and the handler's migrations with ``consumer migrate``."""
        result = await self.command("migrate", "--handler", self.handler)
        assert result.exit_code == 0, f"consumer migrate failed with {result.exit_code}\n{result.stderr}"

    async def produce(self, records: Iterable[kafka.Record]) -> list[int]:
        """Produce `records` in order, one request each, and return their offsets."""
        return await kafka.produce(self.bootstrap, self.topic, records)


class Rows:
    """Reads the framework's and the test handler's tables over one connection of the test."""

    def __init__(self, connection: asyncpg.Connection, stack: Stack) -> None:
        self.connection = connection
        self.stack = stack

    async def effects_per_key(self, worker: str | None = None) -> dict[str, int]:
        """Count effect rows per key, of the workers named `worker` (``test_worker=...``) or of all."""
        rows = await self.connection.fetch(
            "SELECT idem_key, count(*) AS n FROM test_app.effects WHERE $1::text IS NULL OR worker = $1"
            " GROUP BY idem_key",
            worker,
        )
        return {row["idem_key"]: row["n"] for row in rows}

    async def effect_count(self) -> int:
        count: int = await self.connection.fetchval("SELECT count(*) FROM test_app.effects")
        return count

    async def positions(self, scope: str | None = None) -> dict[int, dict[str, Any]]:
        """Return the positions rows of the topic under `scope` (the group id by default), by partition."""
        rows = await self.connection.fetch(
            "SELECT * FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2",
            scope or self.stack.group_id,
            self.stack.topic,
        )
        return {row["partition"]: dict(row) for row in rows}

    async def next_offsets(self, scope: str | None = None) -> dict[int, int]:
        return {partition: row["next_offset"] for partition, row in (await self.positions(scope)).items()}

    async def inbox_count(self, scope: str | None = None) -> int:
        count: int = await self.connection.fetchval(
            "SELECT count(*) FROM consumer.inbox WHERE dedup_scope = $1", scope or self.stack.group_id
        )
        return count

    async def wait_for_next_offsets(
        self, expected: Mapping[int, int], *, scope: str | None = None, timeout_s: float = 60.0
    ) -> None:
        """Wait until the stored next offsets equal `expected`, and name the last ones read on timeout."""
        last: dict[int, int] = {}

        async def reached() -> bool:
            nonlocal last
            last = await self.next_offsets(scope)
            return last == dict(expected)

        try:
            await wait_until(reached, timeout_s=timeout_s, description=f"stored next offsets {dict(expected)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last read {last}") from None


async def wait_until(
    predicate: Callable[[], Awaitable[object]], *, timeout_s: float, description: str, interval_s: float = 0.1
) -> None:
    """Await `predicate` until it returns a truthy value, or raise AssertionError naming `description`."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {description}")
        await anyio.sleep(interval_s)


async def wait_for_output(process: WorkerProcess, text: str, *, timeout_s: float = 30.0, count: int = 1) -> None:
    """Wait until `text` appears `count` times in the output, sleeping on the event loop.

    Raises AssertionError with the end of the output on timeout or when the process exits first.
    """
    deadline = time.monotonic() + timeout_s
    while process.output().count(text) < count:
        if process.returncode is not None:
            raise AssertionError(
                f"process exited with code {process.returncode} before writing {text!r}\n{process.output_tail()}"
            )
        if time.monotonic() >= deadline:
            raise AssertionError(f"{text!r} not written {count} time(s) within {timeout_s} s\n{process.output_tail()}")
        await anyio.sleep(0.05)


def records_with_action(process: WorkerProcess, action: str) -> list[dict[str, Any]]:
    """Return the JSON log records of `process` whose ``action`` is `action`."""
    return [record for record in process.log_records() if record.get("action") == action]


async def wait_for_skipped(process: WorkerProcess, total: int, *, timeout_s: float = 60.0) -> None:
    """Wait until the committed batches of `process` skipped `total` position duplicates in all.

    Reads the DEBUG ``batch_committed`` records, so the worker must log at
    DEBUG (``log__level="DEBUG"``). Unlike the stored position, this shows
    that a worker has read a replayed range even when nothing in it applied.
    """

    async def skipped_all() -> bool:
        records = records_with_action(process, "batch_committed")
        skipped = sum(int(record["position_duplicates"]) for record in records)
        return skipped >= total

    await wait_until(skipped_all, timeout_s=timeout_s, description=f"{total} position duplicates skipped")


async def commit_kafka_offsets(bootstrap: str, group_id: str, topic: str, offsets: Mapping[int, int]) -> None:
    """Join `group_id` with a plain consumer, commit `offsets` (partition to next offset) and leave.

    The group must have no other member.
    """
    # NOTE: Tansu 0.6 rejects a commit from outside the group (generation -1)
    # with UnknownMemberIdError, so the consumer joins before it commits.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        session_timeout_ms=SESSION_TIMEOUT_S * 1000,
        heartbeat_interval_ms=HEARTBEAT_INTERVAL_S * 1000,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30.0
        while not consumer.assignment():
            if time.monotonic() >= deadline:
                raise AssertionError(f"plain consumer got no partition of {topic} in group {group_id} within 30 s")
            await consumer.getmany(timeout_ms=200, max_records=1)
        await consumer.commit({TopicPartition(topic, partition): offset for partition, offset in offsets.items()})
    finally:
        await consumer.stop()
