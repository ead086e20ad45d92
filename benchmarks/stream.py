"""The benchmark's messages: generation, bulk production and the end offsets of each topic.

NOTE: Tansu 0.6 rejects InitProducerId, so the producer runs without
idempotence. After a produce request of several records, Tansu 0.6's
ListOffsets(latest) can return a wrong end offset, so the end offsets used
to decide when a run is done come from the producer's own record metadata.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from consumer.handler import IDEMPOTENCY_KEY_HEADER

__all__ = ["Message", "Topic", "event", "key_stream", "main_stream", "make_value", "plain_stream", "produce"]

VALUE_SIZE = 300
# Messages sent before the producer waits for their acknowledgements.
_IN_FLIGHT = 20_000


@dataclass(frozen=True, slots=True)
class Message:
    """One record to produce; `partition` None lets the producer hash the Kafka key."""

    value: bytes
    key: bytes | None
    partition: int | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Topic:
    """A produced topic and where each partition ended, read from the producer's metadata."""

    name: str
    partitions: int
    messages: int
    # Offset after the last produced record, per partition.
    end_offsets: dict[int, int]
    produce_s: float


def make_value(event_id: str, rng: random.Random) -> bytes:
    """Return a JSON object of `VALUE_SIZE` bytes describing one payment event."""
    body = {
        "event_id": event_id,
        "account": f"acct-{rng.randrange(10_000):05d}",
        "amount": rng.randrange(1, 1_000_000),
        "currency": "EUR",
        "note": "",
    }
    padding = VALUE_SIZE - len(json.dumps(body, separators=(",", ":")).encode())
    body["note"] = "x" * max(padding, 0)
    return json.dumps(body, separators=(",", ":")).encode()


def main_stream(count: int, partitions: int, duplicate_share: float, seed: int) -> list[Message]:
    """Return `count` messages, of which `duplicate_share` repeat an earlier event (same key and value).

    A copy goes to the partition of its original, within the next 1,000
    messages, as a producer retry would. Every message carries its event id
    in the ``Idempotency-Key`` header; handlers in positional mode ignore it.
    """
    rng = random.Random(seed)
    copies = int(count * duplicate_share)
    originals = [event(f"evt-{seed}-{index:08d}", index, partitions, rng) for index in range(count - copies)]
    # Each message gets a sort position: originals their index, copies a
    # point up to 1,000 messages after their original.
    placed = [(float(index), message) for index, message in enumerate(originals)]
    for _ in range(copies):
        index = rng.randrange(len(originals))
        placed.append((index + rng.uniform(0.5, 1_000.0), originals[index]))
    placed.sort(key=lambda pair: pair[0])
    return [message for _, message in placed]


def plain_stream(count: int, partitions: int, seed: int) -> Iterator[Message]:
    """Yield `count` distinct events round-robin over `partitions`, for backlogs too large to hold in memory."""
    rng = random.Random(seed)
    for index in range(count):
        yield event(f"evt-{seed}-{index:08d}", index, partitions, rng)


def event(event_id: str, index: int, partitions: int, rng: random.Random) -> Message:
    """Return the `index`-th event of a stream, for partition ``index % partitions``."""
    return Message(
        value=make_value(event_id, rng),
        key=f"acct-{index % 1_000:04d}".encode(),
        partition=index % partitions,
        headers=((IDEMPOTENCY_KEY_HEADER, event_id.encode()),),
    )


def key_stream(count: int, distinct_keys: int, seed: int) -> Iterator[Message]:
    """Yield `count` messages spread evenly over `distinct_keys` Kafka keys; the key picks the partition."""
    rng = random.Random(seed)
    for index in range(count):
        event_id = f"key-{seed}-{index:08d}"
        yield Message(
            value=make_value(event_id, rng),
            key=f"key-{index % distinct_keys:05d}".encode(),
            partition=None,
            headers=((IDEMPOTENCY_KEY_HEADER, event_id.encode()),),
        )


async def produce(bootstrap_servers: str, topic: str, partitions: int, messages: Iterable[Message]) -> Topic:
    """Send `messages` to `topic` in batches and return its end offsets from the acknowledgements."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=False,
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    await producer.start()
    end_offsets: dict[int, int] = {}
    produced = 0
    try:
        futures: list[asyncio.Future[object]] = []
        for message in messages:
            futures.append(
                await producer.send(
                    topic,
                    value=message.value,
                    key=message.key,
                    partition=message.partition,
                    headers=list(message.headers),
                )
            )
            if len(futures) >= _IN_FLIGHT:
                produced += await _collect(futures, end_offsets)
        produced += await _collect(futures, end_offsets)
    finally:
        await producer.stop()
    return Topic(topic, partitions, produced, end_offsets, loop.time() - started)


async def _collect(futures: list[asyncio.Future[object]], end_offsets: dict[int, int]) -> int:
    """Wait for `futures`, raise the end offset of each record's partition, and empty the list."""
    count = len(futures)
    for metadata in await asyncio.gather(*futures):
        partition, offset = metadata.partition, metadata.offset  # type: ignore[attr-defined]
        end_offsets[partition] = max(end_offsets.get(partition, 0), offset + 1)
    futures.clear()
    return count
