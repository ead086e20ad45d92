"""Handlers of the replay tests that run inside the test process."""

from __future__ import annotations

from consumer import Context, Message
from tests.support import handlers


class InProcessOrderHandler(handlers.OrderHandler):
    """Writes the same effect rows as `OrderHandler`, without its call counter.

    The call counter shares one asyncpg connection per process, which two
    partitions applied at the same time in one process cannot use together.
    """

    async def handle(self, message: Message[handlers.Order], context: Context) -> None:
        order = message.payload
        await context.connection.execute(
            handlers.INSERT_EFFECT,
            message.idempotency_key,
            order.order_id,
            order.amount,
            message.topic,
            message.partition,
            message.offset,
            context.group_id,
        )
