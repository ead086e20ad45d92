"""Publish sample lead events to ``leads``, each event more than once, as a producer that retries does.

Run ``python -m examples.leads.publish --help`` for the options. Every copy
of an event has the same ``event_id``, so the scorer applies it once and
calls the scoring service once per event.
"""

from __future__ import annotations

import argparse
import os

import anyio
from aiokafka import AIOKafkaProducer

from examples.leads.handler import Lead

__all__ = ["main", "sample_leads"]

_COMPANIES = ("Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay Industries")


def sample_leads(count: int) -> list[Lead]:
    """Return `count` distinct lead events with made-up contacts."""
    leads = []
    for number in range(1, count + 1):
        company = _COMPANIES[number % len(_COMPANIES)]
        domain = "gmail.com" if number % 4 == 0 else f"{company.split()[0].lower()}.example"
        leads.append(
            Lead(
                event_id=f"signup-{number}",
                lead_id=f"lead-{number}",
                email=f"contact{number}@{domain}",
                company=company,
                employees=number * 37 % 2000,
                source="signup-form",
            )
        )
    return leads


async def publish(bootstrap_servers: str, topic: str, count: int, copies: int) -> int:
    """Send every sample lead `copies` times, keyed by lead id; return how many records were sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    await producer.start()
    try:
        sent = 0
        for _ in range(copies):
            for lead in sample_leads(count):
                await producer.send_and_wait(topic, lead.model_dump_json().encode(), key=lead.lead_id.encode())
                sent += 1
        return sent
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Publish sample lead events, each one several times.")
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("CONSUMER_KAFKA__BOOTSTRAP_SERVERS", "localhost:29092"),
        help="Kafka brokers as host:port (default: CONSUMER_KAFKA__BOOTSTRAP_SERVERS, else localhost:29092).",
    )
    parser.add_argument("--topic", default="leads", help="Topic to publish to (default leads).")
    parser.add_argument("--count", type=int, default=10, help="Distinct lead events (default 10).")
    parser.add_argument("--copies", type=int, default=2, help="Times each event is sent (default 2).")
    args = parser.parse_args(argv)
    if args.count < 1 or args.copies < 1:
        parser.error("--count and --copies must be at least 1")
    sent = anyio.run(publish, args.bootstrap_servers, args.topic, args.count, args.copies, backend="asyncio")
    print(f"published {sent} records: {args.count} lead events, {args.copies} copies each, to {args.topic}")


if __name__ == "__main__":
    main()
