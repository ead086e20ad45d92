"""Produce at a fixed rate and record when each record was sent: ``python -m benchmarks.paced``.

Runs in its own process so the producer does not share an event loop with
the system under test. Writes one JSON line per record (partition, offset,
send time as ``time.time()``) to ``--output`` once every record is
acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from benchmarks.stream import event

# The producer sends whatever is due every tick, in seconds.
_TICK_S = 0.005


async def produce_paced(
    bootstrap_servers: str, topic: str, partitions: int, rate: float, seconds: float, seed: int
) -> list[tuple[int, int, float]]:
    """Send `rate` messages per second for `seconds`; return (partition, offset, send time) per record."""
    rng = random.Random(seed)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False, acks="all", linger_ms=0)
    await producer.start()
    try:
        sent: list[tuple[asyncio.Future[object], float]] = []
        total = int(rate * seconds)
        started = time.monotonic()
        while len(sent) < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            while len(sent) < due:
                message = event(f"lat-{seed}-{len(sent):08d}", len(sent), partitions, rng)
                sent_at = time.time()
                future = await producer.send(
                    topic,
                    value=message.value,
                    key=message.key,
                    partition=message.partition,
                    headers=list(message.headers),
                )
                sent.append((future, sent_at))
            await asyncio.sleep(_TICK_S)
        records = []
        for future, sent_at in sent:
            metadata = await future
            records.append((metadata.partition, metadata.offset, sent_at))  # type: ignore[attr-defined]
        return records
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paced", description=__doc__)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rate", type=float, required=True, help="Messages per second.")
    parser.add_argument("--seconds", type=float, required=True, help="How long to produce, in seconds.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True, help="File for one JSON line per record.")
    args = parser.parse_args()
    records = asyncio.run(
        produce_paced(args.bootstrap_servers, args.topic, args.partitions, args.rate, args.seconds, args.seed)
    )
    with args.output.open("w") as output:
        for record in records:
            output.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
