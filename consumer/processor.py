"""One processor per assigned partition: applies its batches in order, retries, and reports progress.

The fetch loop hands each partition's records to its processor and keeps
polling, so a slow handler never keeps the member from polling (and so from
staying in the group). A processor owns the retry state of its partition:
a failed message blocks the partition, while other partitions go on.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from consumer import errors, inbox, retry, tracing
from consumer.inbox import AttemptRecord, BatchOutcome, BatchSpec, RetryWithSavepoints
from consumer.message import RawMessage
from consumer.metrics import Metrics
from consumer.stats import Stats

__all__ = ["PartitionProcessor", "ProcessorHooks"]

logger = logging.getLogger(__name__)

# Infrastructure retries back off from this delay up to the cap, in seconds.
_INFRA_BACKOFF_S = 0.2
_INFRA_BACKOFF_MAX_S = 10.0
# After this many consecutive infrastructure failures the partition is
# reported as halted until one batch commits again.
_HALT_AFTER_FAILURES = 3
_ACQUIRE_TIMEOUT_S = 30.0


@dataclass(slots=True)
class ProcessorHooks:
    """Callbacks from a processor to its worker."""

    # Called after each committed batch with (topic, partition, stored next offset).
    committed: Callable[[str, int, int], None]
    # Called when the stored position is ahead of what was fetched: seek there.
    seek: Callable[[str, int, int], None]
    # Called when the backlog is small enough to fetch more for this partition.
    resume: Callable[[str, int], None]


class PartitionProcessor:
    """Applies one partition's messages, in offset order, through `inbox.apply_batch`."""

    def __init__(
        self,
        topic: str,
        partition: int,
        *,
        pool: asyncpg.Pool,
        spec: BatchSpec,
        max_batch_size: int,
        hooks: ProcessorHooks,
        stats: Stats,
        metrics: Metrics,
        epoch: int | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self._pool = pool
        self._spec = spec
        self._max_batch_size = max_batch_size
        self._hooks = hooks
        self._stats = stats
        self._metrics = metrics
        self._labels = (metrics.group_id, topic)
        # Stored position after this processor's last commit; a stored
        # position that moved on without us means another worker got there.
        self._last_committed: int | None = None
        # Replay epoch of the stored position this processor reads from.
        self._epoch = epoch
        self._pending: deque[RawMessage] = deque()
        self._pending_bytes = 0
        self._busy = False
        self._wakeup = anyio.Event()
        self._stop_requested = False
        self._stop_event = anyio.Event()
        self._done = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._attempts: dict[int, AttemptRecord] = {}
        self._rng = random.Random()
        self.halted_reason: str | None = None
        self.last_committed_at: float | None = None

    @property
    def stored_position(self) -> int | None:
        """Stored position after this processor's last commit, if it committed yet."""
        return self._last_committed

    @property
    def idle(self) -> bool:
        """True while nothing is queued or being applied."""
        return not self._pending and not self._busy and not self._stop_requested

    def follow_replay(self, next_offset: int, epoch: int) -> bool:
        """Seek to a position a replay stored while this partition was idle; return whether it did."""
        if not self.idle or epoch == self._epoch or (self._epoch is None and epoch == 0):
            return False
        self._follow_replay(BatchOutcome(next_offset=next_offset, previous_offset=next_offset, epoch=epoch))
        return True

    def note_position(self, next_offset: int) -> None:
        """Record a position the worker stored for this idle partition."""
        self._last_committed = next_offset

    @property
    def backlog(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Key and value bytes of the queued records."""
        return self._pending_bytes

    def submit(self, records: list[RawMessage]) -> None:
        """Queue fetched records; they must follow the ones queued before."""
        self._pending.extend(records)
        self._pending_bytes += sum(_size(record) for record in records)
        self._wakeup.set()

    def request_stop(self) -> None:
        """Finish the message in flight, commit what is done, and end."""
        self._stop_requested = True
        self._stop_event.set()
        self._wakeup.set()

    def cancel(self) -> None:
        """Abandon the message in flight: its transaction is rolled back and it will be redelivered."""
        if self._scope is not None:
            self._scope.cancel()

    async def wait_done(self, timeout_s: float) -> bool:
        """Wait until the processor has ended; return False on timeout."""
        with anyio.move_on_after(timeout_s):
            await self._done.wait()
            return True
        return False

    async def run(self) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                while not self._stop_requested:
                    if not self._pending:
                        self._wakeup = anyio.Event()
                        self._hooks.resume(self.topic, self.partition)
                        await self._wakeup.wait()
                        continue
                    batch = [self._pending.popleft() for _ in range(min(self._max_batch_size, len(self._pending)))]
                    self._pending_bytes -= sum(_size(record) for record in batch)
                    if len(self._pending) < self._max_batch_size:
                        # Less than one batch is left, so fetch the next one
                        # while this one is applied. The records usually
                        # arrive before this batch is done.
                        self._hooks.resume(self.topic, self.partition)
                    self._busy = True
                    try:
                        await self._apply(batch)
                    finally:
                        self._busy = False
        finally:
            self._done.set()

    async def _apply(self, batch: list[RawMessage]) -> None:
        """Apply `batch` until every message is done or a stop is requested."""
        savepoints = False
        infra_failures = 0
        while batch and not self._stop_requested:
            try:
                outcome = await self._transaction(batch, savepoints=savepoints)
            except RetryWithSavepoints as signal:
                # The fast path failed on one message: redo the batch with a
                # savepoint per message, after the backoff of its attempt. A
                # permanent failure needs no backoff: the redo dead-letters it.
                savepoints = True
                record = self._attempts.get(signal.offset)
                if record is None or record.give_up_reason is None:
                    await self._back_off_after_failure(signal.offset, signal.error)
                continue
            except Exception as exc:
                if not retry.is_infrastructure(exc):
                    raise
                infra_failures += 1
                await self._back_off_infrastructure(exc, infra_failures)
                continue

            if outcome.repositioned:
                self._follow_replay(outcome)
                return
            self._epoch = outcome.epoch
            # Attempts of messages the committed position has passed are
            # settled; keeping them only until now means a lost commit
            # cannot reset a message's attempt count.
            for offset in [offset for offset in self._attempts if offset < outcome.next_offset]:
                del self._attempts[offset]
            self._record(outcome)
            self._hooks.committed(self.topic, self.partition, outcome.next_offset)
            if outcome.stopped_at is None:
                self.halted_reason = None
                if outcome.next_offset > batch[-1].offset + 1:
                    self._skip_to(outcome.next_offset)
                return
            batch = [raw for raw in batch if raw.offset >= outcome.stopped_at]
            if isinstance(outcome.failure, inbox.DeadLetterWriteError):
                # What came before the message committed; the partition stays
                # at it, reported halted, until the dead letter can be written.
                infra_failures += 1
                await self._back_off_infrastructure(outcome.failure, infra_failures)
                continue
            infra_failures = 0
            self.halted_reason = None
            if outcome.failure is not None:
                await self._back_off_after_failure(outcome.stopped_at, outcome.failure)

    async def _transaction(self, batch: list[RawMessage], *, savepoints: bool) -> BatchOutcome:
        try:
            connection = await self._pool.acquire(timeout=_ACQUIRE_TIMEOUT_S)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # Whatever keeps a connection from opening (a restart, a database
            # closed to connections, too many clients) is retried, never fatal.
            raise errors.InfrastructureError(
                f"cannot get a PostgreSQL connection: {type(exc).__name__}: {exc}"
            ) from exc
        clean = False
        started = time.perf_counter()
        try:
            with tracing.batch_span(self._spec, batch, savepoints=savepoints) as span:
                outcome = await inbox.apply_batch(
                    connection,
                    self._spec,
                    batch,
                    self._attempts,
                    savepoints=savepoints,
                    should_stop=lambda: self._stop_requested,
                    expected_epoch=self._epoch,
                )
                span.record(outcome)
            clean = True
            self._metrics.transaction_duration.labels(*self._labels).observe(time.perf_counter() - started)
            self._metrics.batch_size.labels(*self._labels).observe(len(batch))
            return outcome
        except RetryWithSavepoints:
            clean = True
            raise
        finally:
            if not clean:
                # The transaction may still be open on the server (cancelled
                # mid-statement or mid-BEGIN). Closing the socket is the only
                # way to be sure it is rolled back and never reused. A
                # connection asyncpg already detached after losing its socket
                # refuses the call, and needs none.
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
            with anyio.CancelScope(shield=True):
                await self._pool.release(connection)

    def _record(self, outcome: BatchOutcome) -> None:
        stats = self._stats
        stats.batches += 1
        stats.applied += outcome.applied
        stats.position_duplicates += outcome.position_duplicates
        stats.key_duplicates += outcome.key_duplicates
        stats.dead_lettered += outcome.dead_lettered
        stats.handler_calls += outcome.handler_calls
        stats.dead_letter_reasons.update(outcome.dead_letter_reasons)
        stats.parked += outcome.parked
        stats.conflicts += outcome.conflicts
        stats.tombstones_skipped += outcome.tombstones_skipped
        self.last_committed_at = time.time()
        for raw, failure, status in outcome.dead_letter_events:
            parked = status == "parked"
            (logger.warning if parked else logger.error)(
                "message %s after %d attempt(s): %s: %s",
                "parked" if parked else "dead-lettered",
                failure.attempts,
                failure.last_error_type,
                failure.last_error,
                extra={
                    "action": "message_parked" if parked else "message_dead_lettered",
                    "group_id": self._spec.group_id,
                    "topic": raw.topic,
                    "partition": raw.partition,
                    "offset": raw.offset,
                    "handler": self._spec.handler.name(),
                    "attempt": failure.attempts,
                    "reason": failure.reason,
                },
            )
        metrics, labels = self._metrics, self._labels
        if outcome.applied:
            metrics.messages_processed.labels(*labels).inc(outcome.applied)
        if outcome.key_duplicates:
            metrics.duplicates_skipped.labels(*labels, "key").inc(outcome.key_duplicates)
        if outcome.replay_duplicates:
            metrics.duplicates_skipped.labels(*labels, "replay").inc(outcome.replay_duplicates)
        redelivered = outcome.position_duplicates - outcome.replay_duplicates
        if redelivered:
            fenced = self._last_committed is not None and outcome.previous_offset != self._last_committed
            cause = "fenced" if fenced else "position"
            metrics.duplicates_skipped.labels(*labels, cause).inc(redelivered)
        if outcome.conflicts:
            metrics.key_conflicts.labels(*labels).inc(outcome.conflicts)
        for reason in outcome.dead_letter_reasons:
            metrics.dead_letters.labels(*labels, reason).inc()
        self._last_committed = outcome.next_offset
        logger.debug(
            "batch committed",
            extra={
                "action": "batch_committed",
                "topic": self.topic,
                "partition": self.partition,
                "offset": outcome.next_offset,
                "applied": outcome.applied,
                "key_duplicates": outcome.key_duplicates,
                "position_duplicates": outcome.position_duplicates,
            },
        )

    def _follow_replay(self, outcome: BatchOutcome) -> None:
        """Drop what was fetched under the old position and fetch from the one a replay stored."""
        self._epoch = outcome.epoch
        self._last_committed = outcome.next_offset
        self._pending.clear()
        self._pending_bytes = 0
        self._attempts.clear()
        self._hooks.seek(self.topic, self.partition, outcome.next_offset)
        logger.info(
            "position moved by a replay to %d; fetching from there",
            outcome.next_offset,
            extra={
                "action": "replay_followed",
                "topic": self.topic,
                "partition": self.partition,
                "offset": outcome.next_offset,
            },
        )

    def _skip_to(self, next_offset: int) -> None:
        """Drop queued records below the stored position and fetch from there."""
        while self._pending and self._pending[0].offset < next_offset:
            self._pending_bytes -= _size(self._pending.popleft())
        if not self._pending:
            self._hooks.seek(self.topic, self.partition, next_offset)

    async def _back_off_after_failure(self, offset: int, error: BaseException) -> None:
        record = self._attempts.get(offset)
        attempt = record.count if record else 1
        delay = self._spec.policy.backoff_s(attempt, rng=self._rng)
        self._stats.retries += 1
        self._metrics.retries.labels(*self._labels, "handler").inc()
        logger.warning(
            "handler failed on attempt %d of %d, retrying in %.2fs: %s: %s",
            attempt,
            self._spec.policy.max_attempts,
            delay,
            type(error).__name__,
            error,
            extra={
                "action": "message_retry_scheduled",
                "topic": self.topic,
                "partition": self.partition,
                "offset": offset,
                "attempt": attempt,
                "handler": self._spec.handler.name(),
            },
        )
        await self._sleep(delay)

    async def _back_off_infrastructure(self, error: BaseException, failures: int) -> None:
        delay = min(_INFRA_BACKOFF_MAX_S, _INFRA_BACKOFF_S * 2 ** (failures - 1))
        delay = delay / 2 + self._rng.uniform(0, delay / 2)
        self._stats.infrastructure_retries += 1
        self._metrics.retries.labels(*self._labels, "infrastructure").inc()
        if failures >= _HALT_AFTER_FAILURES or isinstance(error, inbox.DeadLetterWriteError):
            self.halted_reason = f"{type(error).__name__}: {error}"
        log = logger.error if isinstance(error, inbox.DeadLetterWriteError) else logger.warning
        # One line per failure streak length that is a power of two keeps a
        # long outage from flooding the log.
        if failures & (failures - 1) == 0:
            log(
                "batch transaction failed (%d in a row), retrying in %.2fs: %s: %s",
                failures,
                delay,
                type(error).__name__,
                error,
                extra={
                    "action": "batch_retry_scheduled",
                    "topic": self.topic,
                    "partition": self.partition,
                    "attempt": failures,
                },
            )
        await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        """Sleep for `delay` seconds, or less if a stop is requested meanwhile."""
        with anyio.move_on_after(delay):
            await self._stop_event.wait()

    def status(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "backlog": self.backlog,
            "halted": self.halted_reason,
        }


def _size(record: RawMessage) -> int:
    return len(record.value or b"") + len(record.key or b"")
