"""Helpers of the integration tests: settings, schema, in-process workers, records and row inspection.

A test runs `consumer.worker.Worker` inside its own event loop through
`running_worker`, writes records with `tests.support.kafka.produce`, and reads
the outcome from PostgreSQL through `Rows`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer import migrations, settings
from consumer.handler import Handler
from consumer.worker import Worker
from tests.support import handlers, kafka
from tests.support.process import REPO_ROOT
from tests.support.waiting import wait_for

__all__ = [
    "HANDLER_NAMESPACE",
    "HOOKS_VAR",
    "Rows",
    "commit_kafka_offsets",
    "hooks_json",
    "migrate",
    "order_record",
    "produce_at_once",
    "run_cli",
    "running_worker",
    "unique_group",
    "url_with_user",
    "worker_settings",
]

HOOKS_VAR = "CONSUMER_TEST_HOOKS"

# Namespace of the test handlers' own migrations, as `consumer migrate --handler` records it.
HANDLER_NAMESPACE = handlers.OrderHandler.group_id

# Short delays keep retries within a test's time budget.
# The periodic Kafka offset commit runs once an hour, so in effect only the
# commit at stop reaches Kafka. A stop while the periodic commit is in flight
# loses that commit and leaves a failed aiokafka task behind, which fails an
# in-process test (test_worker_lifecycle pins this). Tests that read Kafka
# offsets set a short interval and wait for Kafka to catch up before a stop.
FAST_WORKER: dict[str, Any] = {
    "max_attempts": 3,
    "retry_backoff_s": 0.05,
    "retry_backoff_max_s": 0.2,
    "poll_timeout_s": 0.1,
    "kafka_commit_interval_s": 3600.0,
    "shutdown_timeout_s": 10.0,
}


def unique_group(prefix: str = "it") -> str:
    """Return a consumer group id that no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def worker_settings(
    kafka_bootstrap: str,
    database_url: str,
    topic: str,
    group_id: str,
    *,
    worker: Mapping[str, Any] | None = None,
    postgres: Mapping[str, Any] | None = None,
    dedup_scope: str | None = None,
) -> settings.Settings:
    """Build settings for one in-process worker, with single fields of `worker` and `postgres` overridden."""
    # NOTE: Tansu 0.6 responds to the first JoinGroup of a group after half the
    # session timeout, so the smallest timeout Kafka accepts keeps joins short.
    return settings.load(
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topics": [topic],
            "group_id": group_id,
            "session_timeout_s": 6.0,
            "heartbeat_interval_s": 1.0,
        },
        postgres={"dsn": database_url, **(postgres or {})},
        worker={**FAST_WORKER, **(worker or {})},
        dedup_scope=dedup_scope,
    )


async def migrate(database_url: str) -> None:
    """Apply the framework's migrations and the test handlers' migrations to `database_url`."""
    connection = await asyncpg.connect(database_url)
    try:
        framework = migrations.discover(migrations.framework_migrations_dir())
        await migrations.migrate(connection, "consumer", migrations.FRAMEWORK_NAMESPACE, framework)
        await migrations.migrate(connection, "consumer", HANDLER_NAMESPACE, migrations.discover(handlers.MIGRATIONS))
    finally:
        await connection.close()


def run_cli(*args: str, env: Mapping[str, str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m consumer *args`` to the end and return its exit code and output.

    The child gets this environment without any ``CONSUMER_*`` variable, then `env`.
    """
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CONSUMER_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def url_with_user(url: str, user: str, password: str) -> str:
    """Return `url` with its user and password replaced, keeping host, port, database and query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password)}@{host}{port}"))


def hooks_json(hooks: Mapping[str, Mapping[str, Any]]) -> str:
    """Encode fault hooks for the CONSUMER_TEST_HOOKS variable that the test handlers read."""
    return json.dumps(hooks)


def order_record(
    key: str,
    *,
    partition: int = 0,
    amount: int = 1,
    value: bytes | None = None,
    headers: Sequence[tuple[str, bytes | None]] = (),
) -> kafka.Record:
    """Return an order record carrying `key` in its Idempotency-Key header.

    The value defaults to a valid order whose id is the key; `headers` follow the key header.
    """
    if value is None:
        value = json.dumps({"order_id": key, "amount": amount}).encode()
    return kafka.Record(
        partition=partition,
        key=key.encode(),
        value=value,
        headers=[("Idempotency-Key", key.encode()), *headers],
    )


async def produce_at_once(bootstrap_servers: str, topic: str, records: Sequence[kafka.Record]) -> float:
    """Send `records` concurrently from one producer and return the seconds from the first send to the last ack."""
    # NOTE: Tansu 0.6 rejects InitProducerId, so idempotence is off, as in tests.support.kafka.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        started = time.monotonic()
        futures = [
            await producer.send(
                topic, value=record.value, key=record.key, partition=record.partition, headers=list(record.headers)
            )
            for record in records
        ]
        for future in futures:
            await future
        return time.monotonic() - started
    finally:
        await producer.stop()


async def commit_kafka_offsets(bootstrap_servers: str, group_id: str, topic: str, offsets: Mapping[int, int]) -> None:
    """Join `group_id` with a plain consumer, commit `offsets` (partition to next offset), and leave.

    The group must have no other member, as after its workers stopped.
    """
    # NOTE: Tansu 0.6 rejects a commit from outside the group (generation -1)
    # with UnknownMemberIdError, which Kafka accepts for an empty group, so the
    # consumer joins first.
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
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


@asynccontextmanager
async def running_worker(
    handler: Handler[Any],
    config: settings.Settings,
    *,
    partitions: int = 1,
    join_timeout_s: float = 30.0,
    stop_timeout_s: float = 20.0,
) -> AsyncIterator[Worker]:
    """Run a `Worker` in a task until the block ends, then stop it and wait for `run` to return.

    Entering waits until the worker owns `partitions` partitions. An error that
    ends the worker is raised from the block, inside an ExceptionGroup.
    """
    worker = Worker(handler, config)
    finished = anyio.Event()

    async def run() -> None:
        try:
            await worker.run()
        finally:
            finished.set()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(run)
        try:
            await wait_for(
                lambda: _owns(worker, partitions),
                timeout_s=join_timeout_s,
                description=f"worker of group {worker.group_id} to own {partitions} partition(s)",
            )
            yield worker
        finally:
            worker.stop()
            with anyio.move_on_after(stop_timeout_s):
                await finished.wait()
            if not finished.is_set():
                task_group.cancel_scope.cancel()
                raise AssertionError(f"worker of group {worker.group_id} did not stop within {stop_timeout_s} s")


async def _owns(worker: Worker, partitions: int) -> bool:
    return len(worker.health()["assigned"]) >= partitions


class Rows:
    """Reads the framework's and the test handlers' tables over one connection of its own."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection

    async def effect_keys(self) -> list[str]:
        """Return the idempotency key of every effect row, in insertion order."""
        rows = await self.connection.fetch("SELECT idem_key FROM test_app.effects ORDER BY seq")
        return [row["idem_key"] for row in rows]

    async def effects(self, key: str | None = None) -> list[asyncpg.Record]:
        """Return effect rows with their transaction id (`xid`), optionally for one key, in insertion order."""
        rows: list[asyncpg.Record] = await self.connection.fetch(
            "SELECT *, xmin::text::bigint AS xid FROM test_app.effects"
            " WHERE $1::text IS NULL OR idem_key = $1 ORDER BY seq",
            key,
        )
        return rows

    async def invocations(self, key: str) -> int:
        """Return how often the test handler was called for `key`, rolled-back calls included."""
        count: int = await self.connection.fetchval(
            "SELECT count(*) FROM test_app.invocations WHERE idem_key = $1", key
        )
        return count

    async def positions(self, scope: str, topic: str) -> dict[int, asyncpg.Record]:
        """Return the positions rows of `topic` under `scope`, by partition."""
        rows = await self.connection.fetch(
            "SELECT * FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2", scope, topic
        )
        return {row["partition"]: row for row in rows}

    async def next_offsets(self, scope: str, topic: str) -> dict[int, int]:
        """Return the stored next offset of each partition of `topic` under `scope`."""
        return {partition: row["next_offset"] for partition, row in (await self.positions(scope, topic)).items()}

    async def dead_letters(self) -> list[asyncpg.Record]:
        """Return every dead letter with its transaction id (`xid`), by topic, partition and offset."""
        rows: list[asyncpg.Record] = await self.connection.fetch(
            'SELECT *, xmin::text::bigint AS xid FROM consumer.dead_letters ORDER BY topic, partition, "offset"'
        )
        return rows

    async def inbox_keys(self, scope: str) -> list[str]:
        rows = await self.connection.fetch(
            "SELECT idempotency_key FROM consumer.inbox WHERE dedup_scope = $1 ORDER BY idempotency_key", scope
        )
        return [row["idempotency_key"] for row in rows]

    async def wait_for_next_offsets(
        self, scope: str, topic: str, expected: Mapping[int, int], *, timeout_s: float = 20.0
    ) -> None:
        """Wait until the stored positions of `topic` equal `expected` (partition to next offset)."""
        deadline = time.monotonic() + timeout_s
        while (stored := await self.next_offsets(scope, topic)) != dict(expected):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"positions of {topic} are {stored} after {timeout_s} s, expected {dict(expected)}"
                )
            await anyio.sleep(0.1)
