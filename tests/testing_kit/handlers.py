"""Handlers the testing kit's own tests run: a ledger of orders, and variants that fail or leak effects."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import asyncpg
import pydantic

from consumer import Context, Handler, Message

MIGRATIONS = Path(__file__).parent / "migrations"

INSERT_ENTRY = "INSERT INTO kit_ledger.entries (order_id, amount) VALUES ($1, $2)"
COUNT_ENTRIES = "SELECT count(*) FROM kit_ledger.entries WHERE order_id = $1"
COUNT_NOTIFICATIONS = "SELECT count(*) FROM kit_ledger.notifications WHERE order_id = $1"


class Order(pydantic.BaseModel):
    order_id: str
    amount: int


class LedgerHandler(Handler[Order]):
    """Writes one ledger entry per order, keyed by order id; fails the first `failures[order_id]` calls."""

    topics = ("kit-orders",)
    group_id = "kit-ledger"
    payload_model = Order
    migrations = MIGRATIONS

    def __init__(self, failures: dict[str, int] | None = None) -> None:
        self.failures = Counter(failures or {})
        self.calls: Counter[str] = Counter()

    def idempotency_key(self, message: Message[Order]) -> str:
        return message.payload.order_id

    async def handle(self, message: Message[Order], context: Context) -> None:
        order = message.payload
        self.calls[order.order_id] += 1
        await context.connection.execute(INSERT_ENTRY, order.order_id, order.amount)
        if self.failures[order.order_id] > 0:
            self.failures[order.order_id] -= 1
            raise RuntimeError(f"order {order.order_id}: injected failure")


class UnkeyedLedgerHandler(LedgerHandler):
    """The ledger deduplicated by Kafka position only."""

    group_id = "kit-ledger-unkeyed"

    def idempotency_key(self, message: Message[Order]) -> str | None:
        return None


class LeakyHandler(LedgerHandler):
    """Also writes a notification to `notify_dsn` over a connection of its own, outside the batch transaction.

    A retry repeats that write, which `assert_applied_once` must catch.
    """

    group_id = "kit-ledger-leaky"
    notify_dsn = ""

    async def handle(self, message: Message[Order], context: Context) -> None:
        connection = await asyncpg.connect(self.notify_dsn)
        try:
            await connection.execute(
                "INSERT INTO kit_ledger.notifications (order_id) VALUES ($1)", message.payload.order_id
            )
        finally:
            await connection.close()
        await super().handle(message, context)
