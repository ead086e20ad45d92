"""Slow handlers for key-level concurrency tests: each call awaits a sleep outside the database."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import anyio

from consumer import Context, Message
from tests.support.handlers import INSERT_EFFECT, Order, OrderBatchHandler, OrderHandler, record_call, worker_name


class KeyedSlowHandler(OrderHandler):
    """Sleeps CONSUMER_TEST_SLEEP_S (default 0.2 s) per call, concurrently across Kafka keys."""

    ordering = "key"
    max_concurrency = 8
    # Calls in flight right now and the most seen at once, for in-process tests.
    in_flight: ClassVar[int] = 0
    most_in_flight: ClassVar[int] = 0

    async def handle(self, message: Message[Order], context: Context) -> None:
        cls = type(self)
        cls.in_flight += 1
        cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        try:
            await record_call(message.idempotency_key)
            await anyio.sleep(float(os.environ.get("CONSUMER_TEST_SLEEP_S", "0.2")))
            await context.connection.execute(
                INSERT_EFFECT,
                message.idempotency_key,
                message.payload.order_id,
                message.payload.amount,
                message.topic,
                message.partition,
                message.offset,
                worker_name(),
            )
        finally:
            cls.in_flight -= 1


class UnorderedSlowHandler(KeyedSlowHandler):
    ordering = "none"


def effect_order(rows: list[Any]) -> dict[str, list[int]]:
    """Group effect rows by Kafka key (the order id prefix) in commit order, as offsets."""
    by_key: dict[str, list[int]] = {}
    for row in rows:
        by_key.setdefault(row["order_id"].split(":")[0], []).append(row["offset"])
    return by_key


class SlowBatchHandler(OrderBatchHandler):
    """Sleeps CONSUMER_TEST_SLEEP_S (default 0.05 s) per batch, so fetching runs far ahead of applying."""

    async def handle_batch(self, messages: Any, context: Context) -> None:
        await anyio.sleep(float(os.environ.get("CONSUMER_TEST_SLEEP_S", "0.05")))
        await super().handle_batch(messages, context)
