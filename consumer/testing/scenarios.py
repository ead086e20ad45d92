"""Faults that need a broker: real `Worker` instances of one handler, stopped and started around the fault.

A `WorkerScenario` owns one topic, one database and one dedup scope. Its
helpers produce records, run workers in the test's event loop, and inject:

- `crash_after_commit`: a worker applies everything and commits it to
  PostgreSQL. It then stops abruptly before it copies the positions to
  Kafka, because its Kafka commit interval is an hour, and a second worker
  takes over;
- `run_two_deployments`: two workers in two consumer groups with one dedup
  scope read the same partitions at the same time, as two deployments of
  one service do by mistake;
- `replay_from_earliest`: ``consumer replay --to-earliest`` as a library call,
  then a worker reads the whole topic again.

After each, `assert_applied_once` checks the dedup record, the position and
the handler's own effect count, as `InboxHarness.assert_applied_once` does.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer, TopicPartition

from consumer import db, embedded, kafka, replay, settings
from consumer.handler import Handler, build_message
from consumer.message import Header, RawMessage
from consumer.side_effects import encode_value
from consumer.stats import Stats
from consumer.testing.state import EffectCount, InboxState, idempotency_key_of
from consumer.worker import Worker

__all__ = ["CrashReport", "Record", "WorkerScenario"]

# Worker settings for tests: short polls, no retry backoff to wait for, and a
# Kafka offset commit that in effect only happens at a graceful stop.
TEST_WORKER_SETTINGS: dict[str, Any] = {
    "poll_timeout_s": 0.1,
    "retry_backoff_s": 0.0,
    "retry_backoff_max_s": 0.0,
    "kafka_commit_interval_s": 3600.0,
    "shutdown_timeout_s": 10.0,
}
# NOTE: Tansu 0.6 responds to the first JoinGroup of a new group after half
# the session timeout. 6 s is the smallest session timeout Kafka accepts by
# default (group.min.session.timeout.ms), so joins stay short on both.
TEST_KAFKA_SETTINGS: dict[str, Any] = {"session_timeout_s": 6.0, "heartbeat_interval_s": 1.0}

_JOIN_TIMEOUT_S = 60.0
_SETTLE_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class Record:
    """One record to produce; `partition` None lets the producer's partitioner choose by key."""

    value: Any
    key: str | bytes | None = None
    headers: Sequence[Header] = ()
    partition: int | None = 0


@dataclass(frozen=True, slots=True)
class CrashReport:
    """Positions, Kafka offsets and worker counters observed by `crash_after_commit`."""

    # Positions stored in PostgreSQL when the first worker was stopped.
    stored: dict[int, int]
    # The group's committed Kafka offsets at that moment: None where nothing
    # was committed, which proves the crash hit the window.
    kafka_committed: dict[int, int | None]
    # Counters of the worker that crashed and of the one that took over.
    crashed: Stats
    restarted: Stats


@dataclass
class WorkerScenario:
    """Real workers of `handler` on `topic` (with `partitions` partitions), writing to the database at `dsn`.

    The database needs the framework's and the handler's migrations, and the
    topic must exist (`create_topic` creates it). `worker_settings` and
    `kafka_settings` override single fields of the settings groups.
    """

    handler: Handler[Any]
    bootstrap_servers: str
    dsn: str
    topic: str
    partitions: int = 1
    group_id: str = ""
    dedup_scope: str = ""
    schema: str = "consumer"
    worker_settings: Mapping[str, Any] = field(default_factory=dict)
    kafka_settings: Mapping[str, Any] = field(default_factory=dict)
    produced: list[RawMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        handler_class = type(self.handler)
        handler_class.validate_declaration()
        self.group_id = self.group_id or f"{handler_class.group_id}-{uuid.uuid4().hex[:8]}"
        self.dedup_scope = self.dedup_scope or self.group_id
        self.state = InboxState(self.dsn, self.dedup_scope, schema=self.schema)

    # -- set-up -------------------------------------------------------------

    async def create_topic(self) -> None:
        """Create the topic with `partitions` partitions, or leave an existing one as it is."""
        await embedded.create_topic(self.bootstrap_servers, self.topic, self.partitions)

    def settings(self, *, group_id: str | None = None, **worker: Any) -> settings.Settings:
        """Build a worker's settings: this scenario's servers, topic and scope, and `worker` fields on top."""
        return settings.load(
            kafka={
                "bootstrap_servers": self.bootstrap_servers,
                "topics": [self.topic],
                "group_id": group_id or self.group_id,
                **TEST_KAFKA_SETTINGS,
                **self.kafka_settings,
            },
            postgres={"dsn": self.dsn, "schema": self.schema},
            worker={**TEST_WORKER_SETTINGS, **self.worker_settings, **worker},
            dedup_scope=self.dedup_scope,
        )

    async def produce(self, *records: Record | Any) -> list[RawMessage]:
        """Send records in order, each acknowledged before the next; return them with their offsets.

        A value that is not a `Record` goes to partition 0 without a key.
        Values are encoded as ``context.publish`` encodes them.
        """
        # NOTE: Tansu 0.6 rejects InitProducerId, so idempotence is off, and
        # each record gets its own request because it reported wrong offsets
        # for multi-record batches.
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, enable_idempotence=False, acks="all")
        await producer.start()
        sent: list[RawMessage] = []
        try:
            for item in records:
                record = item if isinstance(item, Record) else Record(item)
                key = record.key.encode("utf-8") if isinstance(record.key, str) else record.key
                value = encode_value(record.value)
                metadata = await producer.send_and_wait(
                    self.topic, value=value, key=key, partition=record.partition, headers=list(record.headers)
                )
                sent.append(
                    RawMessage(self.topic, metadata.partition, metadata.offset, key, value, tuple(record.headers))
                )
        finally:
            await producer.stop()
        self.produced.extend(sent)
        return sent

    # -- running workers ------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run_worker(self, *, group_id: str | None = None, **worker: Any) -> AsyncIterator[Worker]:
        """Run a worker until the block ends, then stop it gracefully.

        Entering waits until the worker joined its group and owns
        partitions. An error that ends the worker is raised from the block.
        """
        async with self._running(group_id=group_id, **worker) as (instance, _):
            yield instance

    async def wait_until_settled(self, *workers: Worker, timeout_s: float = _SETTLE_TIMEOUT_S) -> None:
        """Wait until the stored positions are past every produced record, and each of `workers` settled them all.

        A worker has settled a record when it applied, skipped or
        dead-lettered it. A worker that joined after the positions moved on
        fetches less, so pass only workers that read from the start.
        """
        ends: dict[int, int] = {}
        for raw in self.produced:
            ends[raw.partition] = max(ends.get(raw.partition, 0), raw.offset + 1)
        count = len(self.produced)
        description = f"positions {ends} of {self.topic} and {len(workers)} worker(s) settling {count} record(s)"

        async def settled() -> bool:
            positions = await self._stored_positions()
            if any(positions.get(partition, -1) < end for partition, end in ends.items()):
                return False
            return all(_settled(instance.stats) >= count for instance in workers)

        await _wait_for(settled, timeout_s, description)

    # -- faults ---------------------------------------------------------------

    async def crash_after_commit(self, *, timeout_s: float = _SETTLE_TIMEOUT_S) -> CrashReport:
        """Let a worker apply the produced records, kill it before any Kafka commit, and start another one.

        The first worker is cancelled without a graceful stop, so it never
        copies its positions to Kafka: the group's committed offsets stay
        where they were, and a plain Kafka consumer would redeliver every
        record. The second worker joins the group, reads the positions from
        PostgreSQL, and runs until it settled whatever it fetched.
        """
        async with self._running() as (first, crash):
            await self.wait_until_settled(first, timeout_s=timeout_s)
            stored = await self._stored_positions()
            crash()
        committed = await self.kafka_committed()

        async with self._running() as (second, _):
            await self.wait_until_settled(timeout_s=timeout_s)
            # One more poll round, so a redelivered batch would have reached the processors.
            polled = second.last_poll_at or 0.0
            await _wait_for(
                lambda: _after(second, polled), timeout_s, "a poll of the worker that took over after the crash"
            )
        return CrashReport(stored=stored, kafka_committed=committed, crashed=first.stats, restarted=second.stats)

    async def run_two_deployments(
        self, *records: Record | Any, timeout_s: float = _SETTLE_TIMEOUT_S
    ) -> tuple[Stats, Stats]:
        """Produce `records` while two workers of two groups with this dedup scope consume; return their counters.

        Both workers own every partition and fetch every record; one applies
        each record, and the other finds it applied (by position or key).
        """
        async with contextlib.AsyncExitStack() as stack:
            first, _ = await stack.enter_async_context(self._running(group_id=f"{self.group_id}-a"))
            second, _ = await stack.enter_async_context(self._running(group_id=f"{self.group_id}-b"))
            await self.produce(*records)
            await self.wait_until_settled(first, second, timeout_s=timeout_s)
        return first.stats, second.stats

    async def replay_from_earliest(self, *, timeout_s: float = _SETTLE_TIMEOUT_S) -> list[replay.PartitionPlan]:
        """Move the scope's positions to the log start, as ``consumer replay --to-earliest --yes`` does, and reread.

        Returns the dry-run plan of each partition. A worker then reads every
        retained record again; the records it settles are counted, and none
        should apply.
        """
        config = self.settings()
        queries = db.load_queries("replay.sql", self.schema)
        connection = await db.connect(config.postgres)
        try:
            plans = await replay.plan(
                config,
                connection,
                queries,
                self.handler,
                dedup_scope=self.dedup_scope,
                topic=self.topic,
                partitions=None,
                target=replay.Target("earliest"),
            )
            await replay.apply_moves(
                connection, queries, dedup_scope=self.dedup_scope, group_id=self.group_id, topic=self.topic, plans=plans
            )
        finally:
            await connection.close()

        async with self._running() as (worker, _):
            await self.wait_until_settled(worker, timeout_s=timeout_s)
        return plans

    # -- assertions -----------------------------------------------------------

    async def assert_applied_once(
        self, message: RawMessage | str, *, effects: EffectCount | None = None, expected_effects: int = 1
    ) -> None:
        """Assert that a produced record, or an idempotency key, was applied once.

        The checks are those of `InboxState.assert_applied_once`, over every
        produced copy of the key.
        """
        if isinstance(message, RawMessage):
            built = build_message(self.handler, message)
            key, keyed = built.idempotency_key, built.keyed
        else:
            key, keyed = message, True
        copies = [raw for raw in self.produced if idempotency_key_of(self.handler, raw) == key]
        await self.state.assert_applied_once(
            key, keyed=keyed, messages=copies, effects=effects, expected_effects=expected_effects
        )

    async def kafka_committed(self, group_id: str | None = None) -> dict[int, int | None]:
        """Return the group's committed Kafka offset per partition, None where nothing is committed."""
        # A consumer that never subscribes never joins the group, so reading
        # the offsets does not disturb the group's members.
        consumer = kafka.consumer(self.settings().kafka, group_id or self.group_id)
        await consumer.start()
        try:
            return {
                partition: await consumer.committed(TopicPartition(self.topic, partition))
                for partition in range(self.partitions)
            }
        finally:
            await consumer.stop()

    # -- internals ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _running(
        self, *, group_id: str | None = None, **worker: Any
    ) -> AsyncIterator[tuple[Worker, Callable[[], None]]]:
        """Run a worker; yield it and a function that cancels it at once, as a crash would."""
        instance = Worker(self.handler, self.settings(group_id=group_id, **worker))
        finished = anyio.Event()
        crashed = False

        async with anyio.create_task_group() as task_group:
            run_scope = anyio.CancelScope()

            async def run() -> None:
                try:
                    with run_scope:
                        await instance.run()
                finally:
                    finished.set()

            def crash() -> None:
                nonlocal crashed
                crashed = True
                run_scope.cancel()

            task_group.start_soon(run)
            try:
                await _wait_for(
                    lambda: _joined(instance, finished),
                    _JOIN_TIMEOUT_S,
                    f"worker of group {instance.group_id} to join and own partitions",
                )
                yield instance, crash
            finally:
                if not crashed:
                    instance.stop()
                with anyio.move_on_after(_STOP_TIMEOUT_S):
                    await finished.wait()
                if not finished.is_set():
                    task_group.cancel_scope.cancel()
                    raise AssertionError(f"worker of group {instance.group_id} did not stop within {_STOP_TIMEOUT_S} s")

    async def _stored_positions(self) -> dict[int, int]:
        positions = await self.state.positions()
        return {partition: offset for (topic, partition), offset in positions.items() if topic == self.topic}


def _settled(stats: Stats) -> int:
    return (
        stats.applied
        + stats.position_duplicates
        + stats.key_duplicates
        + stats.dead_lettered
        + stats.parked
        + stats.tombstones_skipped
    )


async def _joined(worker: Worker, finished: anyio.Event) -> bool:
    if finished.is_set():
        # The worker ended during start-up; leaving the wait lets the block re-raise its error.
        return True
    return worker.joined and bool(worker.health()["assigned"])


async def _after(worker: Worker, moment: float) -> bool:
    return (worker.last_poll_at or 0.0) > moment


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {description}")
        await anyio.sleep(0.05)
