"""Publish the sample webhook deliveries to ``github-webhooks``, each one more than once.

A webhook forwarder retries when it gets no acknowledgement, so the same
delivery (same ``event_id``, the X-GitHub-Delivery GUID) can reach Kafka
twice. Each record is keyed by the object the delivery is about, so the
deliveries of one issue share a partition. Run
``python -m examples.webhooks.publish --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import anyio
from aiokafka import AIOKafkaProducer

__all__ = ["main"]

SAMPLE = Path(__file__).parent / "data" / "deliveries-sample.jsonl"


def kafka_key(line: bytes) -> bytes | None:
    """Return ``kind:id`` of the delivery's object, or None for a delivery about no object."""
    entity = json.loads(line).get("entity")
    if not isinstance(entity, dict):
        return None
    return f"{entity['kind']}:{entity['id']}".encode()


async def publish(bootstrap_servers: str, topic: str, copies: int) -> int:
    """Send every sample line `copies` times; return how many records were sent."""
    lines = [line for line in SAMPLE.read_bytes().splitlines() if line.strip()]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    await producer.start()
    try:
        for _ in range(copies):
            for line in lines:
                await producer.send_and_wait(topic, value=line, key=kafka_key(line))
    finally:
        await producer.stop()
    return len(lines) * copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("CONSUMER_KAFKA__BOOTSTRAP_SERVERS", "localhost:9092"),
        help="Kafka brokers as host:port [default: CONSUMER_KAFKA__BOOTSTRAP_SERVERS, else localhost:9092].",
    )
    parser.add_argument("--topic", default="github-webhooks", help="Topic to publish to (default github-webhooks).")
    parser.add_argument("--copies", type=int, default=2, help="How often each delivery is sent (default 2).")
    args = parser.parse_args()
    if args.copies < 1:
        parser.error(f"--copies {args.copies} is invalid; send each delivery at least once")
    sent = anyio.run(publish, args.bootstrap_servers, args.topic, args.copies, backend="asyncio")
    print(f"sent {sent} records to {args.topic}")


if __name__ == "__main__":
    main()
