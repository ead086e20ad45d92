"""Run a handler over messages through the real inbox transaction, without a broker.

`InboxHarness` builds `RawMessage` records the way the worker receives them
from Kafka and hands them to `consumer.inbox.apply_batch`, the function the
worker's partition processors call. So positions, dedup records, retries
with savepoints, dead letters, stored steps and outbox rows behave as in
production. What the harness leaves out is the broker: it assigns offsets
itself, and it retries a failed message at once instead of after the
policy's backoff.

Fault helpers, each followed by `InboxHarness.assert_applied_once`:

- `deliver_twice`: a producer sends the same message again (a new offset);
- `redeliver`: Kafka delivers the same offsets again, as after a crash
  between the database commit and the Kafka offset commit;
- `race`: two transactions apply the same messages of one partition at the
  same time, as a zombie worker and the partition's new owner do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg

from consumer import db, inbox
from consumer.handler import Handler, build_message
from consumer.inbox import AttemptRecord, BatchOutcome, BatchSpec, RetryWithSavepoints
from consumer.message import Header, RawMessage
from consumer.retry import RetryPolicy
from consumer.side_effects import SideEffects, encode_value
from consumer.testing.state import EffectCount, InboxState, idempotency_key_of

__all__ = ["Delivery", "InboxHarness"]

# Seconds `race` waits for the racing transactions to queue behind the fence row.
_RACE_QUEUE_TIMEOUT_S = 10.0

HeadersLike = Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """Counts of one delivery, summed over the transactions it took."""

    messages: tuple[RawMessage, ...]
    outcomes: tuple[BatchOutcome, ...]
    # Handler errors of failed attempts, in order; the message was retried
    # or dead-lettered after each.
    errors: tuple[BaseException, ...]

    @property
    def applied(self) -> int:
        """Messages whose handler call committed."""
        return sum(outcome.applied for outcome in self.outcomes)

    @property
    def key_duplicates(self) -> int:
        """Messages skipped because their idempotency key was applied before."""
        return sum(outcome.key_duplicates for outcome in self.outcomes)

    @property
    def position_duplicates(self) -> int:
        """Messages skipped because the stored position was already past them."""
        return sum(outcome.position_duplicates for outcome in self.outcomes)

    @property
    def duplicates(self) -> int:
        """Messages skipped as duplicates, by key or by position."""
        return self.key_duplicates + self.position_duplicates

    @property
    def dead_lettered(self) -> int:
        return sum(outcome.dead_lettered for outcome in self.outcomes)

    @property
    def parked(self) -> int:
        return sum(outcome.parked for outcome in self.outcomes)

    @property
    def conflicts(self) -> int:
        """Messages whose key was applied before with another payload."""
        return sum(outcome.conflicts for outcome in self.outcomes)

    @property
    def dead_letter_reasons(self) -> list[str]:
        return [reason for outcome in self.outcomes for reason in outcome.dead_letter_reasons]


class InboxHarness:
    """Applies messages with one handler to one database, as a worker's partition processor would.

    `dsn` is a database with the framework's migrations and the handler's
    own (the ``consumer_harness`` fixture prepares one). Every method opens
    connections of its own and closes them before it returns, so a harness
    can be shared between tests and needs no closing.

    `group_id` and `dedup_scope` default to the handler's, and `topic` to its
    first topic. `max_attempts` defaults to the handler's `retry` policy, else
    3, the worker's default. No backoff is waited between attempts.
    """

    def __init__(
        self,
        handler: Handler[Any] | type[Handler[Any]],
        dsn: str,
        *,
        topic: str | None = None,
        group_id: str | None = None,
        dedup_scope: str | None = None,
        max_attempts: int | None = None,
        handler_timeout_s: float | None = None,
        schema: str = "consumer",
    ) -> None:
        handler_class = handler if isinstance(handler, type) else type(handler)
        handler_class.validate_declaration()
        self.handler: Handler[Any] = handler_class() if isinstance(handler, type) else handler
        self.dsn = dsn

        self.topic = topic or handler_class.topics[0]
        self.group_id = group_id or handler_class.group_id
        self.dedup_scope = dedup_scope or handler_class.dedup_scope or self.group_id

        # The retry count of the handler or the caller, without the backoff.
        base_policy = handler_class.retry or RetryPolicy()
        self.policy = dataclasses.replace(
            base_policy,
            max_attempts=max_attempts or base_policy.max_attempts,
            initial_backoff_s=0.0,
            max_backoff_s=0.0,
        )

        self.state = InboxState(dsn, self.dedup_scope, schema=schema)
        self._side_queries = db.load_queries("side_effects.sql", schema)
        self.spec = BatchSpec(
            handler=self.handler,
            queries=db.load_queries("inbox.sql", schema),
            dedup_scope=self.dedup_scope,
            group_id=self.group_id,
            policy=self.policy,
            handler_timeout_s=handler_timeout_s,
            side_effects=self._side_effects,
            side_queries=self._side_queries,
        )

        self._next_offsets: dict[tuple[str, int], int] = defaultdict(int)
        # Failed attempts per partition, kept between deliveries as a
        # partition processor keeps them between batches.
        self._attempts: dict[tuple[str, int], dict[int, AttemptRecord]] = defaultdict(dict)
        self._delivered: dict[str, list[RawMessage]] = defaultdict(list)

    # -- building messages ------------------------------------------------

    def message(
        self,
        value: Any,
        *,
        key: str | bytes | None = None,
        headers: HeadersLike = (),
        topic: str | None = None,
        partition: int = 0,
        offset: int | None = None,
        timestamp_ms: int | None = None,
    ) -> RawMessage:
        """Build a record as the worker would fetch it, at the partition's next offset by default.

        `value` is encoded as ``context.publish`` encodes it: bytes as they
        are, text as UTF-8, a pydantic model or JSON data as JSON, None as a
        tombstone.
        """
        topic = topic or self.topic
        slot = (topic, partition)
        if offset is None:
            offset = self._next_offsets[slot]
        self._next_offsets[slot] = max(self._next_offsets[slot], offset + 1)
        return RawMessage(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key.encode("utf-8") if isinstance(key, str) else key,
            value=encode_value(value),
            headers=_headers(headers),
            timestamp_ms=timestamp_ms,
        )

    def messages_from_jsonl(
        self,
        lines: Iterable[str | bytes],
        *,
        key: Callable[[Any], str | None] | None = None,
        partitions: int = 1,
        topic: str | None = None,
    ) -> list[RawMessage]:
        """Build one record per non-blank JSON line, its value the line's bytes unchanged.

        `key` takes the parsed line and returns the Kafka key, which also
        picks the partition (CRC-32 of the key modulo `partitions`), as a
        keyed producer would.
        """
        records = []
        for line in lines:
            value = (line.encode("utf-8") if isinstance(line, str) else line).rstrip(b"\r\n")
            if not value.strip():
                continue
            kafka_key = key(json.loads(value)) if key is not None else None
            partition = _partition_for(kafka_key, partitions)
            records.append(self.message(value, key=kafka_key, partition=partition, topic=topic))
        return records

    def copy_of(self, raw: RawMessage) -> RawMessage:
        """Return `raw` at the next offset of its partition: a producer's duplicate."""
        return self.message(
            raw.value,
            key=raw.key,
            headers=raw.headers,
            topic=raw.topic,
            partition=raw.partition,
            timestamp_ms=raw.timestamp_ms,
        )

    # -- delivering -------------------------------------------------------

    async def deliver(self, *messages: RawMessage | Any) -> Delivery:
        """Apply `messages` in one batch per partition, retrying failed ones until they apply or are dead-lettered.

        A message that is not a `RawMessage` is built with `message` first.
        Within a partition the records are applied in offset order, as Kafka
        delivers them. Infrastructure errors (a lost connection, a deadlock)
        are raised to the test.
        """
        raws = [item if isinstance(item, RawMessage) else self.message(item) for item in messages]
        outcomes: list[BatchOutcome] = []
        errors: list[BaseException] = []
        for partition_raws in _by_partition(raws).values():
            connection = await asyncpg.connect(self.dsn)
            try:
                part_outcomes, part_errors = await self._apply_partition(connection, partition_raws)
            finally:
                await connection.close()
            outcomes.extend(part_outcomes)
            errors.extend(part_errors)
        return Delivery(messages=tuple(raws), outcomes=tuple(outcomes), errors=tuple(errors))

    async def deliver_twice(self, message: RawMessage | Any, *, same_batch: bool = False) -> tuple[Delivery, Delivery]:
        """Deliver `message`, then a copy of it at a new offset, as a producer retry or a repeated webhook does.

        With `same_batch` both copies arrive in one batch, and the second
        `Delivery` is empty. Without it, the copy is delivered after the
        first transaction committed.
        """
        first = message if isinstance(message, RawMessage) else self.message(message)
        copy = self.copy_of(first)
        if same_batch:
            return await self.deliver(first, copy), Delivery(messages=(), outcomes=(), errors=())
        return await self.deliver(first), await self.deliver(copy)

    async def redeliver(self, delivered: Delivery | Iterable[RawMessage]) -> Delivery:
        """Deliver the same records (same offsets) again.

        This is what Kafka does after a worker committed to PostgreSQL and
        crashed before it committed the offset to Kafka.
        """
        raws = list(delivered.messages if isinstance(delivered, Delivery) else delivered)
        return await self.deliver(*raws)

    async def race(self, *messages: RawMessage | Any, copies: int = 2) -> tuple[Delivery, ...]:
        """Apply the same records of one partition in `copies` transactions at once; return each one's delivery.

        Every transaction is opened and queued behind the partition's fence
        row before any of them may proceed, so they truly overlap, as a
        zombie worker and the partition's new owner do after a rebalance.
        """
        if copies < 2:
            raise ValueError(f"copies={copies} is invalid; a race needs at least 2")
        raws = [item if isinstance(item, RawMessage) else self.message(item) for item in messages]
        groups = _by_partition(raws)
        if len(groups) != 1:
            raise ValueError(f"race needs records of one partition; these span {sorted(groups)}")
        (partition_raws,) = groups.values()

        connections = [await asyncpg.connect(self.dsn) for _ in range(copies)]
        results: list[tuple[list[BatchOutcome], list[BaseException]]] = [([], [])] * copies
        try:
            async with self._fence_held(partition_raws[0]) as release:

                async def run(index: int) -> None:
                    # Each racer keeps its own attempt records, as separate workers do.
                    results[index] = await self._apply_partition(connections[index], partition_raws, attempts={})

                async with anyio.create_task_group() as task_group:
                    for index in range(copies):
                        task_group.start_soon(run, index)
                    await self._wait_for_lock_waiters([c.get_server_pid() for c in connections])
                    await release()
        finally:
            for connection in connections:
                await connection.close()
        return tuple(Delivery(tuple(partition_raws), tuple(out), tuple(err)) for out, err in results)

    # -- assertions -------------------------------------------------------

    async def assert_applied_once(
        self,
        message: RawMessage | str,
        *,
        effects: EffectCount | None = None,
        expected_effects: int = 1,
    ) -> None:
        """Assert that a delivered message (or idempotency key) was applied once.

        Checks its dedup record, that it was not dead-lettered, and that the
        stored position is past every delivered copy. `effects` counts the
        handler's own effects for the key, and the count must equal
        `expected_effects`. It is a SQL query with the key as $1, or a
        coroutine function ``(connection, key) -> int``.
        """
        if isinstance(message, RawMessage):
            built = build_message(self.handler, message)
            key, keyed = built.idempotency_key, built.keyed
        else:
            key, keyed = message, True
        await self.state.assert_applied_once(
            key,
            keyed=keyed,
            messages=self._delivered.get(key, []),
            effects=effects,
            expected_effects=expected_effects,
        )

    async def assert_dead_lettered(self, message: RawMessage, *, reason: str | None = None) -> None:
        """Assert that `message` has a dead letter (with `reason`, when given) and the position moved past it."""
        rows = [
            row
            for row in await self.state.dead_letters()
            if (row["topic"], row["partition"], row["offset"]) == (message.topic, message.partition, message.offset)
        ]
        assert rows, f"{message.position} has no dead letter"
        if reason is not None:
            assert rows[0]["reason"] == reason, f"{message.position} was dead-lettered for {rows[0]['reason']!r}"
        positions = await self.state.positions()
        stored = positions.get((message.topic, message.partition), -1)
        assert stored > message.offset, f"the stored position {stored} is not past {message.position}"

    # -- internals --------------------------------------------------------

    async def _apply_partition(
        self,
        connection: asyncpg.Connection,
        raws: list[RawMessage],
        *,
        attempts: dict[int, AttemptRecord] | None = None,
    ) -> tuple[list[BatchOutcome], list[BaseException]]:
        """Apply one partition's records as `PartitionProcessor` does, without the backoff."""
        if attempts is None:
            attempts = self._attempts[(raws[0].topic, raws[0].partition)]
        outcomes: list[BatchOutcome] = []
        errors: list[BaseException] = []
        pending = raws
        savepoints = False
        # Each message can fail at most max_attempts times plus one fast-path
        # failure before it is settled, which bounds the loop.
        for _ in range((self.policy.max_attempts + 2) * len(raws) + 1):
            try:
                outcome = await inbox.apply_batch(
                    connection, self.spec, pending, attempts, savepoints=savepoints, should_stop=lambda: False
                )
            except RetryWithSavepoints as signal:
                savepoints = True
                errors.append(signal.error)
                continue
            outcomes.append(outcome)
            for offset in [offset for offset in attempts if offset < outcome.next_offset]:
                del attempts[offset]
            if outcome.stopped_at is None:
                self._remember(raws)
                return outcomes, errors
            if isinstance(outcome.failure, inbox.DeadLetterWriteError):
                raise outcome.failure
            if outcome.failure is not None:
                errors.append(outcome.failure)
            pending = [raw for raw in pending if raw.offset >= outcome.stopped_at]
        raise AssertionError(f"{raws[0].topic}-{raws[0].partition} did not settle; last outcome: {outcomes[-1:]}")

    def _remember(self, raws: list[RawMessage]) -> None:
        for raw in raws:
            key = idempotency_key_of(self.handler, raw)
            if key is not None and raw not in self._delivered[key]:
                self._delivered[key].append(raw)

    def _side_effects(self) -> SideEffects:
        return SideEffects(
            queries=self._side_queries,
            dedup_scope=self.dedup_scope,
            acquire_side_connection=self._side_connection,
        )

    @contextlib.asynccontextmanager
    async def _side_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """Lend a connection outside the batch transaction, for step results."""
        connection = await asyncpg.connect(self.dsn)
        try:
            yield connection
        finally:
            await connection.close()

    @contextlib.asynccontextmanager
    async def _fence_held(self, first: RawMessage) -> AsyncIterator[Any]:
        """Hold the partition's fence row in a transaction until the yielded coroutine function releases it."""
        connection = await asyncpg.connect(self.dsn)
        transaction = connection.transaction()
        await transaction.start()
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await transaction.rollback()

        try:
            args = (self.dedup_scope, first.topic, first.partition)
            # The framework's own queries: create the row as a first batch
            # would, uncommitted, and lock it.
            await connection.execute(self.spec.queries.create_position, *args, first.offset, self.group_id)
            await connection.fetchrow(self.spec.queries.lock_position, *args)
            yield release
        finally:
            await release()
            await connection.close()

    async def _wait_for_lock_waiters(self, pids: list[int]) -> None:
        with anyio.fail_after(_RACE_QUEUE_TIMEOUT_S):
            while True:
                waiting = await self.state.fetchval(self.state.queries.lock_waiters, pids)
                if waiting >= len(pids):
                    return
                await anyio.sleep(0.01)


def _headers(headers: HeadersLike) -> tuple[Header, ...]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((name, value.encode("utf-8") if isinstance(value, str) else value) for name, value in pairs)


def _by_partition(raws: list[RawMessage]) -> dict[tuple[str, int], list[RawMessage]]:
    groups: dict[tuple[str, int], list[RawMessage]] = defaultdict(list)
    for raw in raws:
        groups[(raw.topic, raw.partition)].append(raw)
    return {slot: sorted(group, key=lambda raw: raw.offset) for slot, group in groups.items()}


def _partition_for(key: str | None, partitions: int) -> int:
    """Pick a partition from the key with CRC-32, which is stable across runs, unlike ``hash``."""
    if key is None or partitions <= 1:
        return 0
    return zlib.crc32(key.encode("utf-8")) % partitions
