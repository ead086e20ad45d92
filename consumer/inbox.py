"""The exactly-once contract: one PostgreSQL transaction per batch of one partition.

This docstring is the reference for what the framework guarantees. The same
text, with examples, is in docs/guarantees.md.

For each batch fetched from one partition, `apply_batch` runs one
transaction that:

1. locks the partition's row in ``positions`` (keyed by dedup scope, topic
   and partition) and skips every message below the stored ``next_offset``.
   This covers redelivery after a crash, restarts, rebalances and offset
   resets: a position is applied at most once per dedup scope.
2. claims each remaining message's idempotency key in ``inbox`` with an
   insert guarded by the table's primary key (dedup scope, key). A key that
   is already claimed belongs to a message that was applied, so the handler
   is not called. If the claim belongs to a transaction still in flight (the
   same key arriving on another partition at the same time), the insert waits
   for it: when that one commits, this message is a duplicate; when it rolls
   back, this transaction takes the claim and applies the message.
3. calls the handler for the rest, in offset order, on the same connection,
   then sends the statements the calls deferred (`Context.defer`). When a
   handler or a deferred statement fails, the batch is redone with a
   savepoint per message, so only the failing message's effects are rolled
   back.
4. writes a dead letter (raw key, value and headers, position, attempts and
   errors) for a message that cannot be applied, then moves past it. With
   ``failure_mode = "park"`` the message's Kafka key is parked instead, and
   later messages with that key are stored behind it until a redrive.
   A key that arrives again with a different payload (a reused key) is a
   conflict, handled by the handler's ``on_key_conflict``.
5. advances ``next_offset`` past everything handled and commits. Only after
   the commit does the worker commit the Kafka offset. Kafka's committed
   offset is a mirror for tooling; PostgreSQL is the source of truth, and on
   assignment the worker seeks to the stored position.

Consequences, and the limits of the promise:

- Effects written through ``context.connection`` are applied exactly once per
  idempotency key (or per position, for messages without a key), whatever
  the failure: a crash before the commit rolls everything back, and a crash
  after it leaves a position and claims that make redelivery a no-op.
- A worker that lost its partition in a rebalance but still runs (a zombie)
  cannot apply a message twice: its transaction waits on the position row
  lock held by the new owner, then sees the advanced position.
- A key's claim is released again if the transaction stops before reaching
  its message (a retry or a shutdown), so the message is applied later.
- Effects outside this database (HTTP calls, e-mails, other databases) are
  not covered: a retry repeats them. Their handlers must be idempotent on
  their own.
- Key deduplication lasts as long as the ``inbox`` row; position
  deduplication lasts as long as the ``positions`` row.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg

from consumer import concurrency, dead_letters, errors, tracing
from consumer.dead_letters import DeadLetterWriteError, ParkedKeys
from consumer.deferred import DeferredWrites
from consumer.handler import BatchHandler, Context, Handler, build_message
from consumer.message import Message, RawMessage
from consumer.retry import ErrorClass, RetryPolicy, classify
from consumer.side_effects import SideEffects

__all__ = [
    "AttemptRecord",
    "BatchOutcome",
    "BatchSpec",
    "DeadLetterWriteError",
    "RetryWithSavepoints",
    "apply_batch",
]

logger = logging.getLogger(__name__)

# The commit at the end of a batch runs shielded from cancellation, so a
# shutdown cannot cut it in half; this bounds how long it may take.
COMMIT_TIMEOUT_S = 30.0
_TRACEBACK_LIMIT = 8000


class RetryWithSavepoints(Exception):
    """A handler failed in the fast path; the transaction was rolled back to be redone with savepoints."""

    def __init__(self, offset: int, exc: BaseException) -> None:
        super().__init__(f"handler failed at offset {offset}")
        self.offset = offset
        self.error = exc


@dataclass(slots=True)
class AttemptRecord:
    """Failed attempts of one message, kept by the partition's processor between transactions."""

    count: int = 0
    first_error_type: str = ""
    first_error: str = ""
    last_error_type: str = ""
    last_error: str = ""
    traceback: str = ""
    # Set when the failure was permanent: the next pass dead-letters the
    # message without calling the handler again.
    give_up_reason: str | None = None

    def add(self, exc: BaseException) -> None:
        error_type = type(exc).__name__
        message = str(exc) or error_type
        if self.count == 0:
            self.first_error_type, self.first_error = error_type, message
        self.last_error_type, self.last_error = error_type, message
        self.traceback = "".join(traceback.format_exception(exc))[-_TRACEBACK_LIMIT:]
        self.count += 1

    def failure(self, reason: str) -> dead_letters.Failure:
        return dead_letters.Failure(
            reason=reason,
            attempts=self.count,
            first_error_type=self.first_error_type,
            first_error=self.first_error,
            last_error_type=self.last_error_type,
            last_error=self.last_error,
            traceback=self.traceback,
        )


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """Everything `apply_batch` needs besides the messages."""

    handler: Handler[Any]
    queries: Any
    dedup_scope: str
    group_id: str
    policy: RetryPolicy
    handler_timeout_s: float | None
    # Receives the topic and the duration of each handler call, in seconds.
    observe_handler: Callable[[str, float], None] | None = None
    # Builds the step and outbox helper handed to each handler call.
    side_effects: Callable[[], SideEffects] | None = None
    # Queries of side_effects.sql, for publishing dead letters to a topic.
    side_queries: Any = None

    @property
    def handler_logger(self) -> logging.Logger:
        """The logger handed to handlers: their module's."""
        return logging.getLogger(type(self.handler).__module__)


@dataclass(slots=True)
class BatchOutcome:
    """Counts and stop point of one committed batch transaction."""

    # Stored position after the commit: the offset of the next message to apply.
    next_offset: int
    # Stored position when the transaction locked the row.
    previous_offset: int
    # Replay epoch of the row; see `repositioned`.
    epoch: int = 0
    # True when a replay moved the position since the batch was fetched: the
    # transaction did nothing, and the caller must seek to `next_offset`.
    repositioned: bool = False
    applied: int = 0
    position_duplicates: int = 0
    # Part of `position_duplicates`: offsets below the high-water mark that a
    # replay brought back.
    replay_duplicates: int = 0
    key_duplicates: int = 0
    dead_lettered: int = 0
    parked: int = 0
    conflicts: int = 0
    tombstones_skipped: int = 0
    # Offset where the transaction stopped before the end of the batch, for a
    # retry after a backoff (`failure` set) or a shutdown (`failure` None).
    stopped_at: int | None = None
    failure: BaseException | None = None
    handler_calls: int = 0
    dead_letter_reasons: list[str] = field(default_factory=list)
    # Dead letters and parked messages written, logged once the batch committed.
    dead_letter_events: list[tuple[RawMessage, dead_letters.Failure, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Item:
    raw: RawMessage
    message: Message[Any] | None = None
    decode_error: errors.DecodeError | None = None
    build_error: BaseException | None = None
    duplicate: bool = False
    conflict_with: int | None = None
    claimed: bool = False
    skip_tombstone: bool = False
    fingerprint: bytes = b""


async def apply_batch(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    raws: Sequence[RawMessage],
    attempts: dict[int, AttemptRecord],
    *,
    savepoints: bool,
    should_stop: Callable[[], bool],
    expected_epoch: int | None = None,
) -> BatchOutcome:
    """Apply `raws` (one partition, ascending offsets) in one transaction, as the module docstring describes.

    `expected_epoch` is the replay epoch the batch was fetched under (None
    when unknown). If the row has another epoch, nothing is applied and the
    outcome says `repositioned`.

    Raises `RetryWithSavepoints` when a handler fails and `savepoints` is
    False; the transaction is rolled back and the failure recorded in
    `attempts`. Any other exception leaves the connection unusable: the
    caller must discard it, and the batch is retried.
    """
    first = raws[0]
    transaction = connection.transaction()
    await transaction.start()
    position = await _lock_position(connection, spec, first)
    next_offset = position["next_offset"]
    if expected_epoch is not None and position["epoch"] != expected_epoch:
        with anyio.CancelScope(shield=True):
            await transaction.rollback()
        return BatchOutcome(
            next_offset=next_offset, previous_offset=next_offset, epoch=position["epoch"], repositioned=True
        )
    items, replayed = _new_items(raws, position)
    outcome = BatchOutcome(
        next_offset=next_offset,
        previous_offset=next_offset,
        epoch=position["epoch"],
        position_duplicates=len(raws) - len(items),
        replay_duplicates=replayed,
    )

    if items:
        _decode(spec.handler, items)
        await _claim(connection, spec, items, outcome)
        parked = await dead_letters.load_parked(
            connection,
            spec.queries,
            spec.dedup_scope,
            first.topic,
            [item.raw for item in items],
            enabled=spec.handler.failure_mode == "park",
        )
        try:
            await _run(
                connection, spec, items, attempts, outcome, parked, savepoints=savepoints, should_stop=should_stop
            )
        except RetryWithSavepoints as signal:
            with anyio.CancelScope(shield=True):
                try:
                    await transaction.rollback()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    raise errors.InfrastructureError(
                        f"rolling back after a handler failure failed: {type(exc).__name__}: {exc}"
                    ) from signal.error
            raise
        outcome.next_offset = outcome.stopped_at if outcome.stopped_at is not None else raws[-1].offset + 1
    else:
        # Everything was below the position or the high-water mark (a
        # replay over applied offsets): the position still moves past it.
        outcome.next_offset = max(next_offset, raws[-1].offset + 1)

    with anyio.CancelScope(shield=True), anyio.fail_after(COMMIT_TIMEOUT_S):
        if outcome.next_offset != next_offset or outcome.position_duplicates:
            await connection.execute(
                spec.queries.advance_position,
                spec.dedup_scope,
                first.topic,
                first.partition,
                outcome.next_offset,
                spec.group_id,
                outcome.applied,
                outcome.position_duplicates,
                outcome.key_duplicates,
                outcome.dead_lettered + outcome.parked,
            )
        await transaction.commit()
    return outcome


async def _lock_position(connection: asyncpg.Connection, spec: BatchSpec, first: RawMessage) -> asyncpg.Record:
    args = (spec.dedup_scope, first.topic, first.partition)
    row: asyncpg.Record | None = await connection.fetchrow(spec.queries.lock_position, *args)
    if row is None:
        await connection.execute(spec.queries.create_position, *args, first.offset, spec.group_id)
        row = await connection.fetchrow(spec.queries.lock_position, *args)
        assert row is not None
    return row


def _new_items(raws: Sequence[RawMessage], position: asyncpg.Record) -> tuple[list[_Item], int]:
    """Return the messages at or after the position that are not below the high-water mark, and how many were."""
    next_offset: int = position["next_offset"]
    high_water: int = position["high_water"]
    reprocess_until: int | None = position["reprocess_until"]
    items: list[_Item] = []
    replayed = 0
    for raw in raws:
        if raw.offset < next_offset:
            continue
        below_high_water = raw.offset < high_water
        reprocessing = reprocess_until is not None and raw.offset < reprocess_until
        if below_high_water and not reprocessing:
            replayed += 1
            continue
        items.append(_Item(raw))
    return items, replayed


def _decode(handler: Handler[Any], items: list[_Item]) -> None:
    tombstones = handler.tombstone_policy()
    for item in items:
        if item.raw.value is None and tombstones != "handle":
            if tombstones == "skip":
                item.skip_tombstone = True
            else:
                item.decode_error = errors.DecodeError(
                    "null value (tombstone); set the handler's `tombstones` to 'skip' or 'handle' to accept it",
                    reason="tombstone",
                )
            continue
        try:
            item.message = build_message(handler, item.raw)
            if item.message.keyed:
                # Only keyed messages are compared: a position is never reused.
                item.fingerprint = handler.fingerprint(item.message)
        except errors.DecodeError as exc:
            item.decode_error = exc
        except Exception as exc:
            # A bug in a user's decode or key function counts as a failed attempt.
            item.build_error = exc


async def _claim(connection: asyncpg.Connection, spec: BatchSpec, items: list[_Item], outcome: BatchOutcome) -> None:
    """Claim the keys of keyed messages; mark the other copies of a key as duplicates or conflicts."""
    first_copy: dict[str, _Item] = {}
    to_claim: list[_Item] = []
    for item in items:
        message = item.message
        if message is None or not message.keyed:
            continue
        earlier = first_copy.get(message.idempotency_key)
        if earlier is not None:
            item.duplicate = True
            if earlier.fingerprint != item.fingerprint and spec.handler.on_key_conflict != "duplicate":
                item.conflict_with = earlier.raw.offset
            continue
        first_copy[message.idempotency_key] = item
        to_claim.append(item)
    if to_claim:
        rows = await connection.fetch(
            spec.queries.claim_keys,
            spec.dedup_scope,
            items[0].raw.topic,
            items[0].raw.partition,
            [_key(item) for item in to_claim],
            [item.raw.offset for item in to_claim],
            [item.fingerprint for item in to_claim],
        )
        claimed = {row["idempotency_key"] for row in rows}
        for item in to_claim:
            item.claimed = _key(item) in claimed
            item.duplicate = not item.claimed
        await _find_conflicts(connection, spec, [item for item in to_claim if item.duplicate])
    outcome.key_duplicates = sum(1 for item in items if item.duplicate and item.conflict_with is None)


async def _find_conflicts(connection: asyncpg.Connection, spec: BatchSpec, duplicates: list[_Item]) -> None:
    """Mark duplicates whose payload differs from the one their key was first applied with."""
    if not duplicates or spec.handler.on_key_conflict == "duplicate":
        return
    rows = await connection.fetch(spec.queries.stored_fingerprints, spec.dedup_scope, [_key(i) for i in duplicates])
    stored = {row["idempotency_key"]: bytes(row["fingerprint"]) for row in rows}
    for item in duplicates:
        fingerprint = stored.get(_key(item))
        if fingerprint is not None and fingerprint != item.fingerprint:
            item.conflict_with = -1


def _key(item: _Item) -> str:
    assert item.message is not None
    return item.message.idempotency_key


async def _run(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    items: list[_Item],
    attempts: dict[int, AttemptRecord],
    outcome: BatchOutcome,
    parked: ParkedKeys,
    *,
    savepoints: bool,
    should_stop: Callable[[], bool],
) -> None:
    # Without savepoints, every handler call of the batch defers into this
    # buffer, sent once the calls are done. With savepoints, each message
    # sends its own statements inside its savepoint (see `_attempt`).
    deferred = DeferredWrites()
    if not savepoints and isinstance(spec.handler, BatchHandler):
        await _run_whole_batch(connection, spec, items, attempts, outcome, parked, deferred)
    elif not savepoints and spec.handler.ordering != "partition":
        await _run_concurrently(connection, spec, items, attempts, outcome, parked, deferred)
    else:
        await _run_in_order(
            connection, spec, items, attempts, outcome, parked, deferred, savepoints=savepoints, should_stop=should_stop
        )
    # A batch stopped early sends what the messages before the stop deferred:
    # those messages commit.
    await _send_deferred(connection, spec, items, deferred)


async def _run_in_order(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    items: list[_Item],
    attempts: dict[int, AttemptRecord],
    outcome: BatchOutcome,
    parked: ParkedKeys,
    deferred: DeferredWrites,
    *,
    savepoints: bool,
    should_stop: Callable[[], bool],
) -> None:
    for index, item in enumerate(items):
        if should_stop():
            await _stop_at(connection, spec, items, index, outcome, failure=None)
            return
        try:
            if await _settle_without_handler(connection, spec, item, outcome, parked):
                continue
            failure = await _run_one(connection, spec, item, attempts, outcome, parked, deferred, savepoints=savepoints)
        except DeadLetterWriteError as exc:
            # Commit what came before the message; the partition stays at it.
            failure = exc
        if failure is not None:
            await _stop_at(connection, spec, items, index, outcome, failure=failure)
            return


async def _run_concurrently(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    items: list[_Item],
    attempts: dict[int, AttemptRecord],
    outcome: BatchOutcome,
    parked: ParkedKeys,
    deferred: DeferredWrites,
) -> None:
    """Run the batch's handler calls concurrently by key (see `consumer.concurrency`); any failure redoes it.

    A stop request does not cut such a batch short: out-of-order
    completions cannot commit a prefix, so the batch finishes or, past the
    shutdown timeout, is cancelled and rolled back.
    """
    runnable: list[_Item] = []
    for item in items:
        try:
            settled = await _settle_without_handler(connection, spec, item, outcome, parked)
        except DeadLetterWriteError as exc:
            raise RetryWithSavepoints(item.raw.offset, exc) from exc
        if not settled:
            runnable.append(item)
    shared = concurrency.SerializedConnection(connection)

    async def run_one(item: _Item) -> None:
        offset = item.raw.offset
        record = attempts.get(offset)
        if record is not None and (record.give_up_reason or record.count >= spec.policy.max_attempts):
            # Settled in the sequential redo, where its dead letter is written.
            raise RetryWithSavepoints(offset, errors.PermanentError("attempts used up"))
        try:
            attempt = (record.count if record else 0) + 1
            await _attempt(shared, spec, item, attempt, deferred, savepoints=False, outcome=outcome)
        except Exception as exc:
            if _charge_failure(connection, spec, attempts, offset, exc) is None:
                raise
            raise RetryWithSavepoints(offset, exc) from exc
        outcome.applied += 1

    groups = concurrency.group_by_key(runnable, lambda item: item.raw.key, by_key=spec.handler.ordering == "key")
    await concurrency.run_groups(groups, run_one, spec.handler.max_concurrency)


async def _settle_without_handler(
    connection: asyncpg.Connection, spec: BatchSpec, item: _Item, outcome: BatchOutcome, parked: ParkedKeys
) -> bool:
    """Handle an item that needs no handler call (duplicate, conflict, tombstone, bad input, parked key)."""
    if item.conflict_with is not None:
        await _conflict(connection, spec, item, outcome)
        return True
    if item.duplicate:
        return True
    if item.skip_tombstone:
        outcome.tombstones_skipped += 1
        return True
    if item.decode_error is not None:
        record = AttemptRecord()
        record.add(item.decode_error)
        await _give_up(connection, spec, item, record, item.decode_error.reason, outcome, parked)
        return True
    if parked.holds(item.raw):
        record = AttemptRecord()
        record.add(errors.PermanentError(f"an earlier message with Kafka key {item.raw.key!r} is parked"))
        record.count = 0
        await _park(connection, spec, item, record.failure("parked_behind"), outcome)
        return True
    return False


async def _run_whole_batch(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    items: list[_Item],
    attempts: dict[int, AttemptRecord],
    outcome: BatchOutcome,
    parked: ParkedKeys,
    deferred: DeferredWrites,
) -> None:
    handler = spec.handler
    assert isinstance(handler, BatchHandler)
    runnable = []
    for item in items:
        try:
            settled = await _settle_without_handler(connection, spec, item, outcome, parked)
        except DeadLetterWriteError as exc:
            # Redone one message at a time, where the batch stops at this one.
            raise RetryWithSavepoints(item.raw.offset, exc) from exc
        if not settled:
            runnable.append(item)
    broken = next((item for item in runnable if item.build_error is not None), None)
    if broken is not None:
        assert broken.build_error is not None
        attempts.setdefault(broken.raw.offset, AttemptRecord()).add(broken.build_error)
        raise RetryWithSavepoints(broken.raw.offset, broken.build_error)
    messages = [item.message for item in runnable if item.message is not None]
    if not messages:
        return
    context = _context(connection, spec, attempt=1, deferred=deferred)
    try:
        outcome.handler_calls += 1
        timeout = anyio.fail_after(spec.handler_timeout_s) if spec.handler_timeout_s else contextlib.nullcontext()
        with tracing.handler_span(spec, messages, attempt=context.attempt), timeout:
            await handler.handle_batch(messages, context)
    except Exception as exc:
        _raise_if_connection_lost(connection, exc)
        if classify(exc, spec.policy) is ErrorClass.INFRASTRUCTURE:
            raise
        # Which message failed is unknown, so no message is charged an
        # attempt: the batch is redone one message at a time, and each
        # message gets its own attempts there.
        raise RetryWithSavepoints(messages[0].offset, exc) from exc
    outcome.applied += len(messages)


async def _run_one(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    item: _Item,
    attempts: dict[int, AttemptRecord],
    outcome: BatchOutcome,
    parked: ParkedKeys,
    deferred: DeferredWrites,
    *,
    savepoints: bool,
) -> BaseException | None:
    """Run the handler for one message; return the failure when the message must be retried later."""
    offset = item.raw.offset
    record = attempts.get(offset)
    if record is not None and (record.give_up_reason or record.count >= spec.policy.max_attempts):
        # The message failed for good before, but its dead letter was not
        # committed (the fast path rolled back, its write failed, or the
        # transaction was lost): write it now instead of calling the handler.
        await _give_up(connection, spec, item, record, record.give_up_reason or _reason(record), outcome, parked)
        return None

    attempt = (record.count if record else 0) + 1
    try:
        await _attempt(connection, spec, item, attempt, deferred, savepoints=savepoints, outcome=outcome)
    except Exception as exc:
        charged = _charge_failure(connection, spec, attempts, offset, exc)
        if charged is None:
            raise
        record, error_class = charged
        if not savepoints:
            raise RetryWithSavepoints(offset, exc) from exc
        if error_class is ErrorClass.PERMANENT or record.count >= spec.policy.max_attempts:
            await _give_up(connection, spec, item, record, _reason_for(exc, error_class), outcome, parked)
            return None
        return exc
    outcome.applied += 1
    return None


def _charge_failure(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    attempts: dict[int, AttemptRecord],
    offset: int,
    exc: Exception,
) -> tuple[AttemptRecord, ErrorClass] | None:
    """Count a failed handler call against its message and classify the error.

    Return None for an infrastructure error, which the caller re-raises
    without charging the message. A lost connection raises
    `errors.InfrastructureError` here.
    """
    _raise_if_connection_lost(connection, exc)
    error_class = classify(exc, spec.policy)
    if error_class is ErrorClass.INFRASTRUCTURE:
        return None
    record = attempts.setdefault(offset, AttemptRecord())
    record.add(exc)
    if error_class is ErrorClass.PERMANENT:
        record.give_up_reason = _reason_for(exc, error_class)
    return record, error_class


async def _attempt(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    item: _Item,
    attempt: int,
    deferred: DeferredWrites,
    *,
    savepoints: bool,
    outcome: BatchOutcome,
) -> None:
    if item.build_error is not None:
        raise item.build_error
    assert item.message is not None
    outcome.handler_calls += 1
    if not savepoints:
        context = _context(connection, spec, attempt=attempt, deferred=deferred, message=item.message)
        await _call_handler(spec, item.message, context)
        return
    own = DeferredWrites()
    context = _context(connection, spec, attempt=attempt, deferred=own, message=item.message)
    async with connection.transaction():
        await _call_handler(spec, item.message, context)
        # Inside the savepoint, so a deferred statement that fails is this message's failure.
        await own.flush(connection)


async def _call_handler(spec: BatchSpec, message: Message[Any], context: Context) -> None:
    started = time.perf_counter()
    try:
        with tracing.handler_span(spec, [message], attempt=context.attempt):
            if spec.handler_timeout_s is None:
                await spec.handler.handle(message, context)
            else:
                with anyio.fail_after(spec.handler_timeout_s):
                    await spec.handler.handle(message, context)
    finally:
        if spec.observe_handler is not None:
            spec.observe_handler(message.topic, time.perf_counter() - started)


async def _stop_at(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    items: list[_Item],
    index: int,
    outcome: BatchOutcome,
    *,
    failure: BaseException | None,
) -> None:
    """End the transaction before ``items[index]``: give back the claims of the messages not reached."""
    outcome.stopped_at = items[index].raw.offset
    outcome.failure = failure
    rest = items[index:]
    released = [_key(item) for item in rest if item.claimed]
    if released:
        await connection.execute(spec.queries.release_keys, spec.dedup_scope, released)
    outcome.key_duplicates -= sum(1 for item in rest if item.duplicate and item.conflict_with is None)


async def _give_up(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    item: _Item,
    record: AttemptRecord,
    reason: str,
    outcome: BatchOutcome,
    parked: ParkedKeys,
) -> None:
    """Dead-letter the message, or park it and its Kafka key when the handler parks by key."""
    record.count = max(record.count, 1)
    failure = record.failure(reason)
    if parked.enabled and item.raw.key is not None:
        async with _savepoint(connection):
            await dead_letters.park_key(connection, spec.queries, spec.dedup_scope, item.raw)
            await _park(connection, spec, item, failure, outcome)
        parked.keys.add(item.raw.key)
        return
    await _store(connection, spec, item, failure, dead_letters.STATUS_DEAD, outcome)
    outcome.dead_lettered += 1
    outcome.dead_letter_reasons.append(reason)


async def _park(
    connection: asyncpg.Connection, spec: BatchSpec, item: _Item, failure: dead_letters.Failure, outcome: BatchOutcome
) -> None:
    await _store(connection, spec, item, failure, dead_letters.STATUS_PARKED, outcome)
    outcome.parked += 1
    outcome.dead_letter_reasons.append(failure.reason)


async def _conflict(connection: asyncpg.Connection, spec: BatchSpec, item: _Item, outcome: BatchOutcome) -> None:
    """Handle a key that arrived again with a different payload, as the handler's `on_key_conflict` sets."""
    outcome.conflicts += 1
    key = _key(item)
    detail = (
        f"idempotency key {key!r} was already applied with a different payload; "
        "a producer reused the key for another message"
    )
    if spec.handler.on_key_conflict == "dead_letter":
        record = AttemptRecord()
        record.add(errors.PermanentError(detail))
        await _store(connection, spec, item, record.failure("conflict"), dead_letters.STATUS_DEAD, outcome)
        outcome.dead_lettered += 1
        outcome.dead_letter_reasons.append("conflict")
        return
    outcome.key_duplicates += 1
    logger.warning(
        "key conflict skipped: %s",
        detail,
        extra={
            "action": "key_conflict_skipped",
            "group_id": spec.group_id,
            "topic": item.raw.topic,
            "partition": item.raw.partition,
            "offset": item.raw.offset,
        },
    )


@contextlib.asynccontextmanager
async def _savepoint(connection: asyncpg.Connection) -> AsyncIterator[None]:
    """Run a dead-letter write in a savepoint, so its failure leaves the batch transaction usable."""
    try:
        async with connection.transaction():
            yield
    except asyncpg.PostgresError as exc:
        raise DeadLetterWriteError(f"{type(exc).__name__}: {exc}") from exc


async def _store(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    item: _Item,
    failure: dead_letters.Failure,
    status: str,
    outcome: BatchOutcome,
) -> None:
    async with _savepoint(connection):
        await _write_dead_letter(connection, spec, item, failure, status)
    outcome.dead_letter_events.append((item.raw, failure, status))


async def _write_dead_letter(
    connection: asyncpg.Connection, spec: BatchSpec, item: _Item, failure: dead_letters.Failure, status: str
) -> None:
    key = item.message.idempotency_key if item.message is not None else None
    await dead_letters.write(
        connection,
        spec.queries,
        dedup_scope=spec.dedup_scope,
        group_id=spec.group_id,
        handler_name=spec.handler.name(),
        raw=item.raw,
        idempotency_key=key,
        failure=failure,
        status=status,
    )
    try:
        if item.claimed and key is not None:
            await connection.execute(spec.queries.mark_key_dead_lettered, spec.dedup_scope, key)
        if status == dead_letters.STATUS_DEAD and spec.handler.dead_letter_topic and spec.side_queries is not None:
            await dead_letters.publish(connection, spec.side_queries, spec.dedup_scope, spec.handler, item.raw, failure)
    except asyncpg.PostgresError as exc:
        raise DeadLetterWriteError(f"cannot finish the dead letter of {item.raw.position}: {exc}") from exc


def _raise_if_connection_lost(connection: asyncpg.Connection, exc: BaseException) -> None:
    """Turn a handler error caused by a lost connection into an infrastructure error, retried as a batch."""
    if connection.is_closed():
        raise errors.InfrastructureError(
            f"the PostgreSQL connection was lost during the handler: {type(exc).__name__}: {exc}"
        ) from exc


def _context(
    connection: asyncpg.Connection,
    spec: BatchSpec,
    *,
    attempt: int,
    deferred: DeferredWrites,
    message: Message[Any] | None = None,
) -> Context:
    return Context(
        connection=connection,
        group_id=spec.group_id,
        dedup_scope=spec.dedup_scope,
        attempt=attempt,
        logger=spec.handler_logger,
        message=message,
        side_effects_factory=spec.side_effects,
        deferred=deferred,
    )


async def _send_deferred(
    connection: asyncpg.Connection, spec: BatchSpec, items: list[_Item], deferred: DeferredWrites
) -> None:
    """Send the statements the batch's handler calls deferred; a failure redoes the batch one message at a time."""
    if not deferred:
        return
    try:
        await deferred.flush(connection)
    except Exception as exc:
        _raise_if_connection_lost(connection, exc)
        if classify(exc, spec.policy) is ErrorClass.INFRASTRUCTURE:
            raise
        # Which message deferred the failing statement is unknown, so none is
        # charged an attempt: in the redo each message sends its own
        # statements inside its savepoint, where a failure is its own.
        raise RetryWithSavepoints(items[0].raw.offset, exc) from exc


def _reason_for(exc: BaseException, error_class: ErrorClass) -> str:
    if isinstance(exc, errors.DecodeError):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if error_class is ErrorClass.PERMANENT:
        return "permanent"
    return "handler_error"


def _reason(record: AttemptRecord) -> str:
    if record.last_error_type == "TimeoutError":
        return "timeout"
    return "handler_error"
