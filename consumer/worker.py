"""The worker: group membership, the fetch loop, one processor per partition, and shutdown.

Tasks run in one anyio task group: the fetch loop, the partition processors,
the Kafka commit mirror and, when enabled, the health server. If any of them
fails, the task group cancels the others and `Worker.run` raises that error,
so a worker never runs half-alive.

Shutdown (`stop`, called on SIGTERM or SIGINT): stop fetching, let each
processor finish the message in flight and commit, up to
``worker.shutdown_timeout_s``, cancel what is still running (its transaction
rolls back and the message is redelivered later), mirror the positions to
Kafka, leave the group, and log one summary line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from consumer import db, errors, health, kafka, outbox, retention, retry, tracing
from consumer.handler import Handler
from consumer.inbox import BatchSpec
from consumer.message import RawMessage
from consumer.metrics import Metrics
from consumer.processor import PartitionProcessor, ProcessorHooks
from consumer.retry import RetryPolicy
from consumer.settings import Settings
from consumer.side_effects import SideEffects
from consumer.stats import Stats

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

_POSITION_READ_ATTEMPTS = 5
_GAUGE_INTERVAL_S = 5.0
# How often idle partitions look for a replay or an offset gap, in seconds.
_POSITION_CHECK_INTERVAL_S = 2.0
# Table sizes are counted every 12th round of the gauges, once a minute.
_TABLE_GAUGE_EVERY = 12


@dataclass(frozen=True, slots=True)
class _FailureLog:
    """The log line of a failed round of a periodic side task: what failed, its action and the ids."""

    task: str
    action: str
    ids: dict[str, str] = field(default_factory=dict)


class Worker:
    """Consumes the handler's topics and applies each message exactly once."""

    def __init__(self, handler: Handler[Any], settings: Settings) -> None:
        type(handler).validate_declaration()
        self.handler = handler
        self.settings = settings
        self.group_id = settings.kafka.group_id or handler.group_id
        self.topics = list(settings.kafka.topics or handler.topics)
        self.dedup_scope = settings.dedup_scope or handler.dedup_scope or self.group_id
        self.policy = handler.retry or RetryPolicy(
            max_attempts=settings.worker.max_attempts,
            initial_backoff_s=settings.worker.retry_backoff_s,
            max_backoff_s=settings.worker.retry_backoff_max_s,
        )
        self.stats = Stats()
        self.metrics = Metrics(self.group_id)
        self._handler_histograms: dict[str, Any] = {}
        self._processors: dict[TopicPartition, PartitionProcessor] = {}
        self._mirror: dict[TopicPartition, int] = {}
        # One Kafka commit at a time: the final commit of a shutdown waits
        # for a periodic one in flight instead of missing its offsets.
        self._mirror_lock = anyio.Lock()
        self._stop_event = anyio.Event()
        self._stopping = False
        self._fatal: BaseException | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._pool: asyncpg.Pool | None = None
        # Connections outside batch transactions (step results), kept apart so
        # a step never waits for a connection held by a batch.
        self._side_pool: asyncpg.Pool | None = None
        self._relay: outbox.Relay | None = None
        self._publish_pending = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._spec: BatchSpec | None = None
        self.started = False
        # Set once the group has given this member an assignment, even an
        # empty one (more members than partitions).
        self.joined = False
        self.last_poll_at: float | None = None

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The batch connection pool while the worker runs, else None."""
        return self._pool

    # -- lifecycle -------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown; calling it again has no further effect."""
        if not self._stopping:
            self._stopping = True
            logger.info("stopping", extra={"action": "worker_stopping", "group_id": self.group_id})
        self._stop_event.set()

    async def run(self) -> None:
        """Consume until `stop` is called; raise the error that ended the worker, if any."""
        settings = self.settings
        self._pool = await db.create_pool(settings.postgres)
        self._side_pool = await db.create_pool(settings.postgres, side=True)
        queries = db.load_queries("inbox.sql", settings.postgres.schema_name)
        side_queries = db.load_queries("side_effects.sql", settings.postgres.schema_name)
        self._relay = outbox.Relay(
            self._side_pool, side_queries, self.dedup_scope, lambda: kafka.producer(settings.kafka)
        )
        self._spec = BatchSpec(
            handler=self.handler,
            queries=queries,
            dedup_scope=self.dedup_scope,
            group_id=self.group_id,
            policy=self.policy,
            handler_timeout_s=settings.worker.handler_timeout_s,
            observe_handler=self._observe_handler,
            side_effects=lambda: SideEffects(
                queries=side_queries,
                dedup_scope=self.dedup_scope,
                acquire_side_connection=self._acquire_side,
                on_publish=self._published,
            ),
            side_queries=side_queries,
        )
        self._consumer = kafka.consumer(settings.kafka, self.group_id)
        try:
            await self._start_consumer()
            self._log_started()
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                self._consumer.subscribe(self.topics, listener=_Rebalance(self))
                fetch_scope = anyio.CancelScope()
                task_group.start_soon(self._fetch_loop, fetch_scope)
                task_group.start_soon(self._mirror_loop)
                task_group.start_soon(self._gauges_loop)
                task_group.start_soon(self._prune_loop)
                task_group.start_soon(self._position_loop)
                task_group.start_soon(self._relay.run)
                task_group.start_soon(
                    retention.check_horizon, settings.kafka, self.topics, settings.worker.inbox_retention_s
                )
                # Side tasks: each one ends the worker if it fails.
                if settings.worker.health_port is not None:
                    task_group.start_soon(health.serve, self)
                self.started = True
                await self._stop_event.wait()
                fetch_scope.cancel()
                await self._drain()
                task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()
        if self._fatal is not None:
            raise self._fatal

    async def _start_consumer(self) -> None:
        assert self._consumer is not None
        try:
            await self._consumer.start()
        except KafkaError as exc:
            await self._close()
            raise errors.InfrastructureError(
                f"cannot connect to Kafka at {','.join(self.settings.kafka.bootstrap_servers)}: "
                f"{type(exc).__name__}: {exc}; check CONSUMER_KAFKA__BOOTSTRAP_SERVERS and the security settings"
            ) from exc

    def _log_started(self) -> None:
        logger.info(
            "worker started: group %s, topics %s, dedup scope %s, auto_offset_reset=%s, enable_auto_commit=False",
            self.group_id,
            ",".join(self.topics),
            self.dedup_scope,
            self.settings.kafka.auto_offset_reset,
            extra={
                "action": "worker_started",
                "group_id": self.group_id,
                "handler": self.handler.name(),
                "dedup_scope": self.dedup_scope,
                "auto_offset_reset": self.settings.kafka.auto_offset_reset,
                "enable_auto_commit": False,
                "max_attempts": self.policy.max_attempts,
            },
        )

    async def _drain(self) -> None:
        """Let in-flight messages finish up to the shutdown timeout, then cancel the rest."""
        processors = list(self._processors.values())
        for processor in processors:
            processor.request_stop()
        timeout_s = self.settings.worker.shutdown_timeout_s
        deadline = time.monotonic() + timeout_s
        unfinished = []
        for processor in processors:
            if not await processor.wait_done(max(deadline - time.monotonic(), 0.0)):
                unfinished.append(processor)
        for processor in unfinished:
            processor.cancel()
        for processor in unfinished:
            await processor.wait_done(5.0)
        if unfinished:
            logger.warning(
                "shutdown timeout of %.1fs reached: %d partition(s) rolled back their message in flight",
                timeout_s,
                len(unfinished),
                extra={"action": "shutdown_timeout", "group_id": self.group_id},
            )
        await self._commit_mirror()

    async def _close(self) -> None:
        if self._consumer is not None:
            try:
                await self._consumer.stop()
            except KafkaError as exc:
                logger.warning(
                    "leaving the group failed: %s",
                    exc,
                    extra={"action": "group_leave_failed", "group_id": self.group_id},
                )
            else:
                # NOTE: aiokafka sends LeaveGroup only for a generation above 0, so
                # the only member of a group's first generation (seen on Tansu 0.6)
                # leaves by session timeout instead.
                logger.info("left the group", extra={"action": "group_left", "group_id": self.group_id})
            self._consumer = None
        for pool in (self._pool, self._side_pool):
            if pool is not None:
                await pool.close()
        self._pool = None
        self._side_pool = None
        if self.started:
            self.started = False
            logger.info(
                "worker stopped: %s",
                " ".join(f"{name}={value}" for name, value in self.stats.summary().items()),
                extra={"action": "worker_stopped", "group_id": self.group_id, **self.stats.summary()},
            )

    def _observe_handler(self, topic: str, duration_s: float) -> None:
        histogram = self._handler_histograms.get(topic)
        if histogram is None:
            histogram = self._handler_histograms[topic] = self.metrics.handler_duration.labels(self.group_id, topic)
        histogram.observe(duration_s)

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self.stop()

    # -- fetching ---------------------------------------------------------

    async def _fetch_loop(self, scope: anyio.CancelScope) -> None:
        consumer = self._consumer
        assert consumer is not None
        poll_timeout_ms = int(self.settings.worker.poll_timeout_s * 1000)
        # Unset, each poll takes everything the client prefetched: aiokafka
        # sends no fetch to a broker while records of one of its partitions
        # wait unread (up to 100 ms), which would starve the other partitions.
        max_records = self.settings.kafka.fetch_max_records
        # A partition is paused once two batches of it are queued: the next
        # batch is fetched while the current one is applied, and memory stays
        # bounded whatever the size of the topic's backlog. Its processor
        # resumes it once less than a batch is left.
        backlog_limit = 2 * self.settings.worker.max_batch_size
        bytes_limit = self.settings.worker.max_buffered_bytes
        with scope:
            while True:
                poll_started_ns = time.time_ns()
                fetched = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
                self.last_poll_at = time.monotonic()
                tracing.record_poll(fetched, self.group_id, poll_started_ns)
                for tp, records in fetched.items():
                    self._submit(tp, records)
                await self._pause_full(consumer, backlog_limit, bytes_limit, max_records)

    def _submit(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        processor = self._processors.get(tp)
        if processor is None:
            return
        processor.submit([_raw(record) for record in records])
        self.stats.fetched += len(records)

    async def _pause_full(
        self, consumer: AIOKafkaConsumer, backlog_limit: int, bytes_limit: int, max_records: int | None
    ) -> None:
        """Pause the partitions with a full queue, or every partition once the byte bound is reached."""
        assignment = consumer.assignment()
        if self.buffered_bytes() >= bytes_limit:
            consumer.pause(*(tp for tp in self._processors if tp in assignment))
            return
        paused = consumer.paused()
        full = [
            tp
            for tp, processor in self._processors.items()
            if processor.backlog >= backlog_limit and tp in assignment and tp not in paused
        ]
        for tp in full:
            # aiokafka discards what it prefetched for a partition when it is
            # paused, and would fetch it again after the resume. Take it first:
            # it is in memory already, so the call does not wait, and nothing
            # runs between its return and the pause.
            records = await consumer.getmany(tp, timeout_ms=0, max_records=max_records)
            self._submit(tp, records.get(tp, []))
            # During a rebalance getmany waits for the new assignment, which
            # may no longer contain the partition. Pausing it would raise.
            if tp in consumer.assignment():
                consumer.pause(tp)

    def buffered_bytes(self) -> int:
        """Key and value bytes fetched and not yet applied, over all partitions."""
        return sum(processor.pending_bytes for processor in self._processors.values())

    def _resume(self, topic: str, partition: int) -> None:
        consumer = self._consumer
        tp = TopicPartition(topic, partition)
        if consumer is not None and tp in consumer.assignment() and tp in consumer.paused():
            consumer.resume(tp)

    def _seek(self, topic: str, partition: int, offset: int) -> None:
        consumer = self._consumer
        tp = TopicPartition(topic, partition)
        if consumer is not None and tp in consumer.assignment():
            consumer.seek(tp, offset)

    # -- Kafka offset mirror ---------------------------------------------

    def _committed(self, topic: str, partition: int, next_offset: int) -> None:
        self._mirror[TopicPartition(topic, partition)] = next_offset
        if self._relay is not None and self._publish_pending:
            # A handler published since the last commit: the relay sends now
            # rather than polling the outbox on a timer.
            self._publish_pending = False
            self._relay.notify()

    def _published(self) -> None:
        self._publish_pending = True

    def _acquire_side(self) -> Any:
        assert self._side_pool is not None
        return self._side_pool.acquire()

    async def _mirror_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.worker.kafka_commit_interval_s)
            await self._commit_mirror()

    async def _commit_mirror(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit stored positions to Kafka for tooling; a failure is logged and retried next time."""
        async with self._mirror_lock:
            await self._commit_mirror_locked(only)

    async def _commit_mirror_locked(self, only: Iterable[TopicPartition] | None) -> None:
        consumer = self._consumer
        if consumer is None or not self._mirror:
            return
        wanted = set(only) if only is not None else set(self._mirror)
        owned = consumer.assignment()
        offsets = {tp: offset for tp, offset in self._mirror.items() if tp in wanted and tp in owned}
        for tp in wanted:
            self._mirror.pop(tp, None)
        if not offsets:
            return
        try:
            with anyio.CancelScope(shield=True):
                await consumer.commit(offsets)
        except (KafkaError, AssertionError) as exc:
            # Put the offsets back unless a newer position arrived meanwhile,
            # so the next commit retries them.
            for tp, offset in offsets.items():
                if tp in consumer.assignment():
                    self._mirror.setdefault(tp, offset)
            # PostgreSQL already stores these positions; Kafka's copy only
            # feeds lag tools, so a lost partition's commit is simply dropped.
            self.stats.kafka_commit_failures += 1
            logger.info(
                "kafka offset commit skipped: %s: %s",
                type(exc).__name__,
                exc,
                extra={"action": "kafka_commit_skipped", "group_id": self.group_id},
            )

    # -- idle partitions ------------------------------------------------------

    async def _periodically(self, interval_s: float, task: Callable[[], Awaitable[None]], failure: _FailureLog) -> None:
        """Run `task` every `interval_s` seconds; a recoverable failure is logged and retried at the next interval."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await task()
            except Exception as exc:
                if not retry.is_side_task_recoverable(exc):
                    raise
                logger.warning(
                    "%s failed, retrying at the next interval: %s: %s",
                    failure.task,
                    type(exc).__name__,
                    exc,
                    extra={"action": failure.action, **failure.ids},
                )

    async def _position_loop(self) -> None:
        await self._periodically(
            _POSITION_CHECK_INTERVAL_S,
            self._check_idle_positions,
            _FailureLog("position check", "position_check_failed", {"group_id": self.group_id}),
        )

    async def _check_idle_positions(self) -> None:
        """Let idle partitions follow a replay, and move their position over offsets without records.

        A busy partition needs neither: its next batch transaction sees a
        replay's epoch, and its next record moves the position past a gap.
        """
        consumer, pool, spec = self._consumer, self._pool, self._spec
        idle = {tp: processor for tp, processor in self._processors.items() if processor.idle}
        if consumer is None or pool is None or spec is None or not idle:
            return
        rows = await pool.fetch(spec.queries.read_positions, self.dedup_scope, self.topics)
        stored = {TopicPartition(row["topic"], row["partition"]): row for row in rows}
        for tp, processor in idle.items():
            row = stored.get(tp)
            if row is None or not processor.idle:
                continue
            if processor.follow_replay(row["next_offset"], row["epoch"]):
                continue
            fetch_position = await consumer.position(tp)
            if processor.idle and processor.stored_position == row["next_offset"] < fetch_position:
                status = await pool.execute(
                    spec.queries.advance_idle_position,
                    self.dedup_scope,
                    tp.topic,
                    tp.partition,
                    fetch_position,
                    row["next_offset"],
                    row["epoch"],
                )
                if status.endswith(" 1"):
                    processor.note_position(fetch_position)
                    self._committed(tp.topic, tp.partition, fetch_position)

    # -- retention ------------------------------------------------------------

    async def _prune_loop(self) -> None:
        await self._periodically(
            self.settings.worker.prune_interval_s,
            self._prune,
            _FailureLog("pruning", "inbox_prune_failed", {"dedup_scope": self.dedup_scope}),
        )

    async def _prune(self) -> None:
        """Delete dedup records and stored step results older than the retention, in small batches."""
        assert self._pool is not None
        worker_settings = self.settings.worker
        schema = self.settings.postgres.schema_name
        await retention.prune(
            self._pool,
            db.load_queries("replay.sql", schema),
            self.dedup_scope,
            retention_s=worker_settings.inbox_retention_s,
            batch_size=worker_settings.prune_batch_size,
        )
        await retention.prune_side_effects(
            self._pool,
            db.load_queries("side_effects.sql", schema),
            self.dedup_scope,
            retention_s=worker_settings.inbox_retention_s,
            batch_size=worker_settings.prune_batch_size,
        )

    # -- gauges -------------------------------------------------------------

    async def _gauges_loop(self) -> None:
        rounds = 0
        while True:
            self.update_gauges()
            if rounds % _TABLE_GAUGE_EVERY == 0:
                await self._count_tables()
            rounds += 1
            await anyio.sleep(_GAUGE_INTERVAL_S)

    async def _count_tables(self) -> None:
        """Set the inbox and outbox size gauges; a failed count is skipped until the next round."""
        pool = self._pool
        if pool is None:
            return
        inbox_queries = db.load_queries("status.sql", self.settings.postgres.schema_name)
        side_queries = db.load_queries("side_effects.sql", self.settings.postgres.schema_name)
        try:
            inbox_rows = await pool.fetchval(inbox_queries.inbox_rows, self.dedup_scope)
            backlog = await pool.fetchval(side_queries.outbox_backlog, self.dedup_scope)
        except Exception as exc:
            if not retry.is_side_task_recoverable(exc):
                raise
            return
        self.metrics.inbox_rows.labels(self.group_id).set(inbox_rows)
        self.metrics.outbox_backlog.labels(self.group_id).set(backlog)

    def update_gauges(self) -> None:
        """Refresh assignment, halt and lag gauges from in-memory state; lag uses the last fetch's high watermark."""
        consumer = self._consumer
        metrics = self.metrics
        processors = list(self._processors.items())
        metrics.assigned_partitions.labels(self.group_id).set(len(processors))
        metrics.halted_partitions.labels(self.group_id).set(sum(1 for _, p in processors if p.halted_reason))
        if consumer is None:
            return
        for tp, processor in processors:
            highwater = consumer.highwater(tp)
            position = processor.stored_position
            if highwater is not None and position is not None:
                metrics.lag.labels(self.group_id, tp.topic, str(tp.partition)).set(max(highwater - position, 0))

    # -- rebalancing ------------------------------------------------------

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        task_group = self._task_group
        if consumer is None or task_group is None or self._stopping:
            return
        self.stats.rebalances += 1
        self.joined = True
        self.metrics.rebalances.labels(self.group_id).inc()
        new = sorted((tp for tp in assigned if tp not in self._processors), key=lambda tp: (tp.topic, tp.partition))
        if not new:
            return
        consumer.pause(*new)
        try:
            stored = await self._read_positions()
            await self._position_partitions(new, stored)
        except Exception as exc:
            logger.exception(
                "cannot position assigned partitions", extra={"action": "assignment_failed", "group_id": self.group_id}
            )
            self._fail(exc)
            return
        for tp in new:
            processor = self._make_processor(tp, stored[tp][1] if tp in stored else None)
            self._processors[tp] = processor
            task_group.start_soon(processor.run)
        logger.info(
            "partitions assigned: %s",
            ", ".join(f"{tp.topic}-{tp.partition}" for tp in new),
            extra={"action": "partitions_assigned", "group_id": self.group_id},
        )

    async def _read_positions(self) -> dict[TopicPartition, tuple[int, int]]:
        assert self._pool is not None
        assert self._spec is not None
        for attempt in range(1, _POSITION_READ_ATTEMPTS + 1):
            try:
                rows = await self._pool.fetch(self._spec.queries.read_positions, self.dedup_scope, self.topics)
            except Exception as exc:
                if not retry.is_side_task_recoverable(exc) or attempt == _POSITION_READ_ATTEMPTS:
                    raise
                await anyio.sleep(0.5 * attempt)
                continue
            return {TopicPartition(row["topic"], row["partition"]): (row["next_offset"], row["epoch"]) for row in rows}
        raise AssertionError("unreachable")

    async def _position_partitions(
        self, new: list[TopicPartition], stored: dict[TopicPartition, tuple[int, int]]
    ) -> None:
        """Seek each new partition to its stored position; report a position the log no longer holds."""
        consumer = self._consumer
        assert consumer is not None
        known = [tp for tp in new if tp in stored]
        log_start = await consumer.beginning_offsets(known) if known else {}
        for tp in new:
            if tp not in stored:
                logger.info(
                    "no stored position for %s-%d: starting from the group's Kafka offset, else auto_offset_reset=%s",
                    tp.topic,
                    tp.partition,
                    self.settings.kafka.auto_offset_reset,
                    extra={"action": "partition_position_default", "topic": tp.topic, "partition": tp.partition},
                )
                continue
            position = stored[tp][0]
            first = log_start.get(tp, 0)
            if position < first:
                lost = first - position
                self.stats.offsets_lost += lost
                self.metrics.offsets_lost.labels(self.group_id, tp.topic, str(tp.partition)).inc(lost)
                stopping = self.settings.worker.on_offsets_lost == "stop"
                logger.error(
                    "offsets %d to %d of %s-%d were deleted before they were applied (%d messages lost); %s",
                    position,
                    first - 1,
                    tp.topic,
                    tp.partition,
                    lost,
                    "stopping, as CONSUMER_WORKER__ON_OFFSETS_LOST=stop"
                    if stopping
                    else f"continuing from the log start {first}",
                    extra={"action": "offsets_lost", "topic": tp.topic, "partition": tp.partition, "offset": position},
                )
                if self.settings.worker.on_offsets_lost == "stop":
                    raise errors.ConsumerError(
                        f"{tp.topic}-{tp.partition}: offsets {position} to {first - 1} were deleted before they "
                        "were applied; CONSUMER_WORKER__ON_OFFSETS_LOST=stop, so the worker stops. Set it to "
                        "continue, or replay to the log start with `consumer replay --to-earliest`"
                    )
                position = first
            consumer.seek(tp, position)

    def _make_processor(self, tp: TopicPartition, epoch: int | None) -> PartitionProcessor:
        assert self._pool is not None
        assert self._spec is not None
        hooks = ProcessorHooks(committed=self._committed, seek=self._seek, resume=self._resume)
        return PartitionProcessor(
            tp.topic,
            tp.partition,
            pool=self._pool,
            spec=self._spec,
            max_batch_size=self.settings.worker.max_batch_size,
            hooks=hooks,
            stats=self.stats,
            metrics=self.metrics,
            epoch=epoch,
        )

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        """Stop the revoked partitions' processors before the group moves them, keeping their progress."""
        processors = [(tp, self._processors[tp]) for tp in revoked if tp in self._processors]
        for _, processor in processors:
            processor.request_stop()
        timeout_s = self.settings.worker.revoke_timeout_s
        deadline = time.monotonic() + timeout_s
        for tp, processor in processors:
            if not await processor.wait_done(max(deadline - time.monotonic(), 0.0)):
                logger.warning(
                    "%s-%d did not finish its message within %.1fs of the revocation; rolling it back",
                    tp.topic,
                    tp.partition,
                    timeout_s,
                    extra={"action": "revoke_timeout", "topic": tp.topic, "partition": tp.partition},
                )
                processor.cancel()
                await processor.wait_done(5.0)
        await self._commit_mirror(only=[tp for tp, _ in processors])
        for tp, _ in processors:
            del self._processors[tp]
            with contextlib.suppress(KeyError):
                # A partition this worker no longer owns must not report a stale lag.
                self.metrics.lag.remove(self.group_id, tp.topic, str(tp.partition))
        if processors:
            logger.info(
                "partitions revoked: %s",
                ", ".join(f"{tp.topic}-{tp.partition}" for tp, _ in processors),
                extra={"action": "partitions_revoked", "group_id": self.group_id},
            )

    # -- health -------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Return the state probes and `status` read: membership, partitions, halts."""
        processors = list(self._processors.values())
        return {
            "started": self.started,
            "joined": self.joined,
            "stopping": self._stopping,
            "group_id": self.group_id,
            "assigned": [f"{p.topic}-{p.partition}" for p in processors],
            "halted": {f"{p.topic}-{p.partition}": p.halted_reason for p in processors if p.halted_reason},
            "last_poll_at": self.last_poll_at,
        }


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._worker._assign(set(assigned))


def _raw(record: ConsumerRecord[bytes, bytes]) -> RawMessage:
    # Positional arguments: this runs for every fetched record.
    return RawMessage(
        record.topic, record.partition, record.offset, record.key, record.value, tuple(record.headers), record.timestamp
    )
