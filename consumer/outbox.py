"""The outbox relay: sends messages that handlers published, after their transaction committed.

Rows are sent in id order by one relay per dedup scope at a time (an
advisory lock). One partition's batches commit one after another, so the
messages its handlers publish keep their order; ids of rows published from
different partitions interleave. A row is marked sent after the broker acknowledged it; a crash
in between sends it again, so delivery is at least once, and the
``Idempotency-Key`` header each row carries lets the consumer downstream
apply it once.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

__all__ = ["Relay"]

logger = logging.getLogger(__name__)

_BATCH_SIZE = 200
_RETRY_DELAY_S = 1.0


class Relay:
    """Sends one dedup scope's outbox rows with a producer that is started on first use."""

    def __init__(self, pool: asyncpg.Pool, queries: Any, dedup_scope: str, make_producer: Any) -> None:
        self._pool = pool
        self._queries = queries
        self._dedup_scope = dedup_scope
        self._make_producer = make_producer
        self._producer: AIOKafkaProducer | None = None
        self._wakeup = anyio.Event()
        self.sent = 0
        self.last_error = ""
        self._retry = False

    def notify(self) -> None:
        """Wake the relay: a batch with published messages committed."""
        self._wakeup.set()

    async def run(self) -> None:
        """Send rows until cancelled: once at start (rows left by a crash), then whenever notified."""
        try:
            while True:
                while await self.send_batch() == _BATCH_SIZE:
                    pass
                if self._retry:
                    # The other relay held the lock, or sending failed: look
                    # again after a pause even if nobody publishes meanwhile.
                    self._retry = False
                    await anyio.sleep(_RETRY_DELAY_S)
                    continue
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def send_batch(self) -> int:
        """Send up to one batch of unsent rows; return how many were sent."""
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                if not await connection.fetchval(self._queries.relay_lock, self._dedup_scope):
                    self._retry = True
                    return 0
                rows = await connection.fetch(self._queries.unsent, self._dedup_scope, _BATCH_SIZE)
                if not rows:
                    return 0
                sent = await self._send(rows)
                if sent:
                    await connection.execute(self._queries.mark_sent, sent)
                if len(sent) < len(rows):
                    failed = rows[len(sent)]
                    await connection.execute(self._queries.mark_failed, failed["id"], self.last_error)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError) as exc:
            logger.warning(
                "outbox relay failed, retrying in %.1fs: %s: %s",
                _RETRY_DELAY_S,
                type(exc).__name__,
                exc,
                extra={"action": "outbox_relay_failed", "dedup_scope": self._dedup_scope},
            )
            if isinstance(exc, KafkaError):
                # A producer that could not start is dropped; the next try builds a new one.
                with anyio.CancelScope(shield=True):
                    await self.close()
            self._retry = True
            return 0
        if len(sent) < len(rows):
            self._retry = True
        self.sent += len(sent)
        return len(sent)

    async def _send(self, rows: list[asyncpg.Record]) -> list[int]:
        """Send `rows` in order; return the ids acknowledged, stopping at the first failure."""
        producer = await self._producer_started()
        self.last_error = ""
        futures = []
        try:
            for row in rows:
                headers = [
                    (name, bytes(value) if value is not None else b"")
                    for name, value in zip(row["header_names"], row["header_values"], strict=True)
                ]
                key = bytes(row["key"]) if row["key"] is not None else None
                value = bytes(row["value"]) if row["value"] is not None else None
                futures.append((row["id"], await producer.send(row["topic"], value, key=key, headers=headers)))
        except KafkaError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
        acknowledged: list[int] = []
        for row_id, future in futures:
            try:
                await future
            except KafkaError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                break
            acknowledged.append(row_id)
        if self.last_error:
            logger.warning(
                "outbox send failed after %d row(s): %s",
                len(acknowledged),
                self.last_error,
                extra={"action": "outbox_send_failed", "dedup_scope": self._dedup_scope},
            )
        return acknowledged

    async def _producer_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer: AIOKafkaProducer = self._make_producer()
            await producer.start()
            self._producer = producer
        return self._producer

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as exc:
                logger.info("outbox producer stop failed: %s", exc, extra={"action": "outbox_producer_stop_failed"})
