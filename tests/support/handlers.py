"""Handlers the tests run in worker subprocesses, with fault hooks set through the environment.

``CONSUMER_TEST_HOOKS`` holds a JSON object keyed by idempotency key:

- ``{"k-2": {"sleep_before_s": 15}}``: sleep before writing the effect;
- ``{"k-3": {"sleep_after_effect_s": 3}}``: write the effect, then sleep with
  the transaction open;
- ``{"k-3": {"raise": "ValueError", "times": 2}}``: raise on the first
  `times` calls (every call when `times` is absent);
- ``{"k-2": {"sleep_first_call_only": true, ...}}``: apply the sleeps on the
  first call only.

Calls are counted in ``test_app.invocations`` over a separate autocommit
connection (``CONSUMER_POSTGRES__DSN``), so rolled-back calls are visible.
``CONSUMER_TEST_WORKER`` names the worker in effect rows.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import anyio
import asyncpg
import pydantic

from consumer import BatchHandler, Context, Handler, Message

MIGRATIONS = Path(__file__).parent / "migrations"

INSERT_EFFECT = (
    'INSERT INTO test_app.effects (idem_key, order_id, amount, topic, partition, "offset", worker)'
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


class _SideChannel:
    """One autocommit counting connection per event loop and database, used by one call at a time.

    Opening a connection per call would leave the batch transaction idle for
    milliseconds between statements, where tests look for a transaction kept
    open on purpose; sharing one unguarded connection would let two handler
    calls use it at once.
    """

    _connections: ClassVar[dict[tuple[int, str], tuple[asyncpg.Connection, asyncio.Lock]]] = {}

    @classmethod
    async def run(cls, query: str, *args: Any) -> Any:
        dsn = os.environ["CONSUMER_POSTGRES__DSN"]
        slot = (id(asyncio.get_running_loop()), dsn)
        entry = cls._connections.get(slot)
        if entry is None or entry[0].is_closed():
            entry = (await asyncpg.connect(dsn), asyncio.Lock())
            cls._connections[slot] = entry
        connection, lock = entry
        async with lock:
            return await connection.fetchval(query, *args)


def _hooks() -> dict[str, dict[str, Any]]:
    hooks: dict[str, dict[str, Any]] = json.loads(os.environ.get("CONSUMER_TEST_HOOKS", "{}"))
    return hooks


def worker_name() -> str:
    return os.environ.get("CONSUMER_TEST_WORKER", f"pid-{os.getpid()}")


async def record_call(key: str) -> int:
    """Count this call; return how many calls for `key` came before it."""
    previous: int = await _SideChannel.run("SELECT count(*) FROM test_app.invocations WHERE idem_key = $1", key)
    await _SideChannel.run(
        "INSERT INTO test_app.invocations (idem_key, attempt, worker) VALUES ($1, $2, $3)",
        key,
        previous + 1,
        worker_name(),
    )
    return previous


async def _maybe_fail(hook: dict[str, Any], previous_calls: int) -> None:
    error = hook.get("raise")
    if error is None:
        return
    times = hook.get("times")
    if times is None or previous_calls < int(times):
        exception_type = {"ValueError": ValueError, "RuntimeError": RuntimeError}.get(error, RuntimeError)
        raise exception_type(hook.get("message", "boom"))


def _sleeps_now(hook: dict[str, Any], previous_calls: int) -> bool:
    return not hook.get("sleep_first_call_only") or previous_calls == 0


async def _write_effect(message: Message[Any], context: Context, order: Order | None) -> None:
    await context.connection.execute(
        INSERT_EFFECT,
        message.idempotency_key,
        order.order_id if order else None,
        order.amount if order else None,
        message.topic,
        message.partition,
        message.offset,
        worker_name(),
    )


class OrderHandler(Handler[Order]):
    """Writes one effect row per order; topics and group come from the settings in tests."""

    topics = ["orders"]
    group_id = "inbox-test"
    payload_model = Order
    migrations = MIGRATIONS

    async def handle(self, message: Message[Order], context: Context) -> None:
        key = message.idempotency_key
        hook = _hooks().get(key, {})
        previous = await record_call(key)
        sleeps = _sleeps_now(hook, previous)
        if sleeps and hook.get("sleep_before_s"):
            await anyio.sleep(float(hook["sleep_before_s"]))
        await _maybe_fail(hook, previous)
        await _write_effect(message, context, message.payload)
        if sleeps and hook.get("sleep_after_effect_s"):
            await anyio.sleep(float(hook["sleep_after_effect_s"]))


class TwoStepHandler(OrderHandler):
    """Writes an effect, sleeps (hook), then writes a ledger row: both or neither must be visible."""

    async def handle(self, message: Message[Order], context: Context) -> None:
        key = message.idempotency_key
        hook = _hooks().get(key, {})
        previous = await record_call(key)
        await _write_effect(message, context, message.payload)
        if _sleeps_now(hook, previous) and hook.get("sleep_between_s"):
            await anyio.sleep(float(hook["sleep_between_s"]))
        await context.connection.execute(
            "INSERT INTO test_app.ledger (idem_key, amount) VALUES ($1, $2)", key, message.payload.amount
        )


class OrderBatchHandler(BatchHandler[Order]):
    """Writes all effects of a batch in one call; a hooked key makes the whole call fail."""

    topics = ["orders"]
    group_id = "inbox-test"
    payload_model = Order
    migrations = MIGRATIONS

    async def handle_batch(self, messages: Any, context: Context) -> None:
        for message in messages:
            key = message.idempotency_key
            previous = await record_call(key)
            await _maybe_fail(_hooks().get(key, {}), previous)
        await context.connection.executemany(
            INSERT_EFFECT,
            [
                (m.idempotency_key, m.payload.order_id, m.payload.amount, m.topic, m.partition, m.offset, worker_name())
                for m in messages
            ],
        )


def _defer_effect_and_ledger(message: Message[Order], context: Context) -> None:
    """Defer the effect row and a ledger row that divides 100 by the amount, so an amount of 0 fails."""
    order = message.payload
    key = message.idempotency_key
    context.defer(
        INSERT_EFFECT,
        key,
        order.order_id,
        order.amount,
        message.topic,
        message.partition,
        message.offset,
        worker_name(),
    )
    context.defer("INSERT INTO test_app.ledger (idem_key, amount) VALUES ($1, 100 / $2::integer)", key, order.amount)


class DeferredOrderHandler(OrderHandler):
    """Defers its effect row and a ledger row instead of executing them.

    The ledger row divides 100 by the amount, so an order of amount 0 makes
    its deferred statement fail in the database, after the handler returned.
    """

    async def handle(self, message: Message[Order], context: Context) -> None:
        key = message.idempotency_key
        previous = await record_call(key)
        await _maybe_fail(_hooks().get(key, {}), previous)
        _defer_effect_and_ledger(message, context)


class DeferredBatchHandler(OrderBatchHandler):
    """Defers the rows of `DeferredOrderHandler` for each message of the batch, in one call."""

    async def handle_batch(self, messages: Any, context: Context) -> None:
        for message in messages:
            await record_call(message.idempotency_key)
            _defer_effect_and_ledger(message, context)


class KeyOrderedDeferredHandler(DeferredOrderHandler):
    """`DeferredOrderHandler` with concurrent calls per Kafka key."""

    ordering = "key"


class RawOrderHandler(OrderHandler):
    """Like OrderHandler, but takes any JSON (no model), for input-shape tests."""

    payload_model = None

    async def handle(self, message: Message[Any], context: Context) -> None:  # type: ignore[override]
        await record_call(message.idempotency_key)
        await _write_effect(message, context, None)
