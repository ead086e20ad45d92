"""Handlers of the benchmark: the same effect (one row in ``bench.effects``) in each framework mode.

The baseline loops in `benchmarks.drains` write the same row through
`effect_row`, so every system does the same database work per message.
Topics and group ids are placeholders: each run sets them through the
settings (``CONSUMER_KAFKA__TOPICS`` and ``CONSUMER_KAFKA__GROUP_ID`` for a
subprocess).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import anyio

from benchmarks.database import EFFECT_INSERT
from consumer.handler import BatchHandler, Context, Handler
from consumer.message import Message

__all__ = [
    "BatchPositionalHandler",
    "DeferredKeyedHandler",
    "DeferredPositionalHandler",
    "KeyedBatchHandler",
    "KeyedHandler",
    "PartitionSleepHandler",
    "PositionalHandler",
    "SleepHandler",
    "effect_row",
]

# How long `SleepHandler` awaits per message, standing in for an HTTP call.
SLEEP_S = float(os.environ.get("BENCH_SLEEP_S", "0.05"))


def effect_row(topic: str, partition: int, offset: int, payload: dict[str, Any]) -> tuple[Any, ...]:
    """Return the arguments of `EFFECT_INSERT` for one decoded message."""
    return (topic, partition, offset, payload["event_id"], payload["account"], payload["amount"])


def _row(message: Message[dict[str, Any]]) -> tuple[Any, ...]:
    return effect_row(message.topic, message.partition, message.offset, message.payload)


class KeyedHandler(Handler[dict[str, Any]]):
    """Per-message handler deduplicated on the ``Idempotency-Key`` header (the default key)."""

    topics = ("bench",)
    group_id = "bench"

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        await context.connection.execute(EFFECT_INSERT, *_row(message))


class DeferredKeyedHandler(KeyedHandler):
    """Per-message handler that defers its INSERT: the framework sends the batch's rows in one executemany."""

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        context.defer(EFFECT_INSERT, *_row(message))


class DeferredPositionalHandler(DeferredKeyedHandler):
    """`DeferredKeyedHandler` deduplicated by position only."""

    def idempotency_key(self, message: Message[dict[str, Any]]) -> str | None:
        return None


class PositionalHandler(KeyedHandler):
    """Per-message handler deduplicated by position only: no idempotency key."""

    def idempotency_key(self, message: Message[dict[str, Any]]) -> str | None:
        return None


class KeyedBatchHandler(BatchHandler[dict[str, Any]]):
    """Batch handler deduplicated on the ``Idempotency-Key`` header; one executemany per batch."""

    topics = ("bench",)
    group_id = "bench"

    async def handle_batch(self, messages: Sequence[Message[dict[str, Any]]], context: Context) -> None:
        await context.connection.executemany(EFFECT_INSERT, [_row(message) for message in messages])


class BatchPositionalHandler(KeyedBatchHandler):
    """Batch handler deduplicated by position only."""

    def idempotency_key(self, message: Message[dict[str, Any]]) -> str | None:
        return None


class SleepHandler(KeyedHandler):
    """I/O-bound handler: awaits `SLEEP_S`, then writes the effect row; key-ordered."""

    ordering: ClassVar[Literal["partition", "key", "none"]] = "key"

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        await anyio.sleep(SLEEP_S)
        await context.connection.execute(EFFECT_INSERT, *_row(message))


class PartitionSleepHandler(SleepHandler):
    """`SleepHandler` with one call at a time per partition."""

    ordering = "partition"
