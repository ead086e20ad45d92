"""`consumer demo`: the quake-store example end to end, with duplicates and a crash.

Steps: start an embedded broker and PostgreSQL unless real ones are
configured, apply the migrations, publish every event of the input one to
three times on random partitions, run the example worker as a subprocess,
SIGKILL it part-way, restart it, wait until every partition is drained, stop
it with SIGTERM, and check the effects against the input.

The demo owns the schemas ``consumer_demo`` and ``quake_store`` of the
database it is given and recreates them on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from consumer import db, errors, kafka, migrations
from consumer.settings import Settings

__all__ = ["DemoInput", "main"]

DEMO_SCHEMA = "consumer_demo"
_QUERIES = db.load_queries("demo.sql", DEMO_SCHEMA)
HANDLER = "examples.quakes.handler:QuakeHandler"
_REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = _REPOSITORY / "examples" / "quakes" / "data" / "usgs-all-day-2025-05-20.jsonl"
_POLL_INTERVAL_S = 0.05
# The worker is killed once this share of the messages is applied.
_CRASH_AT = 0.35


@dataclass(slots=True)
class DemoInput:
    """The events of the input file and what the effects must look like after the run."""

    lines: list[bytes]
    event_ids: list[str]
    entity_ids: list[str]
    newest_version: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> DemoInput:
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
        event_ids: list[str] = []
        entity_ids: list[str] = []
        newest: dict[str, str] = {}
        for number, line in enumerate(lines, start=1):
            try:
                event = json.loads(line)
                event_id = str(event["event_id"])
                entity_id = str(event["entity"]["id"])
                updated_at = str(event["updated_at"])
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.ConfigurationError(
                    f"{path}:{number} is not a quake event with event_id, entity.id and updated_at ({exc!r})"
                ) from None
            event_ids.append(event_id)
            entity_ids.append(entity_id)
            if entity_id not in newest or updated_at > newest[entity_id]:
                newest[entity_id] = updated_at
        if not lines:
            raise errors.ConfigurationError(f"{path} contains no events; pass a JSON Lines file of quake events")
        return cls(lines=lines, event_ids=event_ids, entity_ids=entity_ids, newest_version=newest)


@dataclass(slots=True)
class Published:
    total: int = 0
    injected_copies: int = 0
    poison: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo and print its summary; return 0 when every check passes."""
    input_path = Path(args.input) if args.input else DEFAULT_INPUT
    if not input_path.is_file():
        raise errors.ConfigurationError(f"input file {input_path} does not exist; pass --input FILE.jsonl")
    demo_input = DemoInput.read(input_path)
    if str(_REPOSITORY) not in sys.path:
        # The example handler lives in the repository's examples/ folder.
        sys.path.insert(0, str(_REPOSITORY))
    if args.partitions < 1:
        raise errors.ConfigurationError(f"--partitions {args.partitions} is invalid; use 1 or more")

    with ExitStack() as services:
        bootstrap = ",".join(settings.kafka.bootstrap_servers)
        dsn = settings.postgres.dsn.get_secret_value() if settings.postgres.dsn else None
        if not bootstrap or not dsn:
            from consumer import embedded

            if not bootstrap:
                _say("starting the embedded Kafka-compatible broker (Tansu)")
                broker = services.enter_context(embedded.start_broker())
                bootstrap = broker.bootstrap_servers
            if not dsn:
                data_dir = Path(tempfile.mkdtemp(prefix="consumer-demo-pg-"))
                # Registered first, so it runs after the server has stopped.
                services.callback(shutil.rmtree, data_dir, ignore_errors=True)
                _say(f"starting the embedded PostgreSQL in {data_dir}")
                server = services.enter_context(embedded.start_postgres(data_dir))
                dsn = server.dsn
        settings.kafka.bootstrap_servers = bootstrap.split(",")
        return asyncio.run(_run(args, settings, dsn, demo_input, input_path))


async def _run(args: argparse.Namespace, settings: Settings, dsn: str, demo_input: DemoInput, input_path: Path) -> int:
    run_id = uuid.uuid4().hex[:8]
    topic = f"quakes-demo-{run_id}"
    group_id = f"quake-store-demo-{run_id}"
    await _prepare_database(dsn)
    await _create_topic(settings, topic, args.partitions)

    _say(f"publishing {len(demo_input.lines)} events from {input_path.name} to {topic}, each 1 to 3 times")
    if args.poison < 0:
        raise errors.ConfigurationError(f"--poison {args.poison} is invalid; use 0 or more")
    published = await _publish(settings, topic, args.partitions, demo_input, random.Random(args.seed), args.poison)
    _say(f"published {published.total} messages ({published.injected_copies} injected copies)")

    env = _worker_env(settings, dsn, topic, group_id)
    deadline = time.monotonic() + args.timeout
    crashed_at: int | None = None
    # Time spent applying messages, from the first committed batch of each
    # worker run to its end; group joins and the restart are left out.
    active_s = 0.0
    connection = await asyncpg.connect(dsn)
    try:
        worker = _start_worker(env)
        if not args.no_crash:
            crash_after = max(1, int(published.total * _CRASH_AT))
            active_s += await _wait_until(connection, group_id, lambda done: done >= crash_after, deadline, worker)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            crashed_at = await _done(connection, group_id)
            _say(f"SIGKILL sent to the worker after {crashed_at} of {published.total} messages; restarting it")
            worker = _start_worker(env)
        active_s += await _wait_until(
            connection, group_id, lambda done: done >= published.total, deadline, worker, published
        )
        worker.send_signal(signal.SIGTERM)
        exit_code = worker.wait(timeout=60)
        summary = await _summary(connection, group_id, demo_input, published)
    finally:
        await connection.close()
    return _report(summary, published, demo_input, active_s, crashed_at, exit_code)


async def _prepare_database(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(_QUERIES.drop_framework_schema)
        await connection.execute(_QUERIES.drop_example_schema)
        from examples.quakes.handler import QuakeHandler

        assert QuakeHandler.migrations is not None
        for namespace, folder in (
            (migrations.FRAMEWORK_NAMESPACE, migrations.framework_migrations_dir()),
            (QuakeHandler.group_id, QuakeHandler.migrations),
        ):
            await migrations.migrate(connection, DEMO_SCHEMA, namespace, migrations.discover(folder))
    finally:
        await connection.close()


async def _create_topic(settings: Settings, topic: str, partitions: int) -> None:
    from aiokafka.admin import NewTopic

    admin = kafka.admin(settings.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def _publish(
    settings: Settings, topic: str, partitions: int, demo_input: DemoInput, rng: random.Random, poison: int = 0
) -> Published:
    """Send each event one to three times, each copy to a random partition; record the end offsets.

    `poison` broken events follow: copies of random events without their
    ``entity`` field and with an event id of their own, as a producer bug
    would send them. The handler fails on them, so they end as dead letters.
    """
    # NOTE: idempotent producing is off because the embedded broker does not
    # implement InitProducerId; copies are what the demo wants anyway.
    producer = kafka.producer(settings.kafka, enable_idempotence=False, linger_ms=5)
    await producer.start()
    published = Published()
    try:
        futures = []
        for line, entity_id in zip(demo_input.lines, demo_input.entity_ids, strict=True):
            copies = rng.randint(1, 3)
            published.injected_copies += copies - 1
            for _ in range(copies):
                future = await producer.send(topic, line, key=entity_id.encode(), partition=rng.randrange(partitions))
                futures.append(future)
        for number in range(poison):
            event = json.loads(rng.choice(demo_input.lines))
            event["event_id"] = f"{event['event_id']}#broken-{number}"
            entity_id = event.pop("entity")["id"]
            broken = json.dumps(event).encode()
            partition = rng.randrange(partitions)
            futures.append(await producer.send(topic, broken, key=entity_id.encode(), partition=partition))
            published.poison += 1
        for metadata in await asyncio.gather(*futures):
            end = published.end_offsets.get(metadata.partition, 0)
            published.end_offsets[metadata.partition] = max(end, metadata.offset + 1)
        published.total = len(futures)
    finally:
        await producer.stop()
    return published


def _worker_env(settings: Settings, dsn: str, topic: str, group_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": ",".join(settings.kafka.bootstrap_servers),
            "CONSUMER_KAFKA__TOPICS": topic,
            "CONSUMER_KAFKA__GROUP_ID": group_id,
            "CONSUMER_KAFKA__SESSION_TIMEOUT_S": "6",
            "CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S": "1",
            "CONSUMER_POSTGRES__DSN": dsn,
            "CONSUMER_POSTGRES__SCHEMA": DEMO_SCHEMA,
            "CONSUMER_WORKER__MAX_BATCH_SIZE": "100",
            "CONSUMER_LOG__LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPOSITORY), env.get("PYTHONPATH")])),
        }
    )
    return env


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "consumer", "run", HANDLER], env=env)  # noqa: S603


async def _done(connection: asyncpg.Connection, group_id: str) -> int:
    """Return how many messages the group has finished: applied, skipped or dead-lettered."""
    total = await connection.fetchval(_QUERIES.finished, group_id)
    return int(total)


async def _wait_until(
    connection: asyncpg.Connection,
    group_id: str,
    condition: Any,
    deadline: float,
    worker: subprocess.Popen[bytes],
    published: Published | None = None,
) -> float:
    """Wait until `condition` holds for the finished count; return the seconds since progress began."""
    baseline = await _done(connection, group_id)
    progress_started: float | None = None
    while True:
        done = await _done(connection, group_id)
        if progress_started is None and done > baseline:
            progress_started = time.monotonic()
        if condition(done) and (published is None or await _drained(connection, group_id, published)):
            return time.monotonic() - (progress_started or time.monotonic())
        if worker.poll() is not None:
            raise errors.ConsumerError(f"the demo worker exited early with code {worker.returncode}; see its log above")
        if time.monotonic() > deadline:
            worker.kill()
            raise errors.ConsumerError("the demo did not finish in time; raise --timeout or check the worker log")
        await asyncio.sleep(_POLL_INTERVAL_S)


async def _drained(connection: asyncpg.Connection, group_id: str, published: Published) -> bool:
    rows = await connection.fetch(_QUERIES.positions, group_id)
    stored = {row["partition"]: row["next_offset"] for row in rows}
    return all(stored.get(partition, 0) >= end for partition, end in published.end_offsets.items())


async def _summary(
    connection: asyncpg.Connection, group_id: str, demo_input: DemoInput, published: Published
) -> dict[str, Any]:
    totals = await connection.fetchrow(_QUERIES.totals, group_id)
    applied_events = await connection.fetch(_QUERIES.applied_events)
    quakes = await connection.fetch(_QUERIES.quakes)
    dead_letters = await connection.fetchval(_QUERIES.dead_letters)
    versions = {row["quake_id"]: row["updated_at"] for row in quakes}
    stale = sum(
        1
        for entity_id, newest in demo_input.newest_version.items()
        if entity_id not in versions or versions[entity_id].isoformat(timespec="milliseconds") != _iso(newest)
    )
    return {
        **dict(totals),
        "effects": sum(row["n"] for row in applied_events),
        "events_applied_twice": sum(1 for row in applied_events if row["n"] > 1),
        "quake_rows": len(quakes),
        "stale_rows": stale,
        "dead_letters": dead_letters,
        "unique_events": len(set(demo_input.event_ids)),
        "unique_quakes": len(set(demo_input.entity_ids)),
    }


def _iso(text: str) -> str:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).isoformat(timespec="milliseconds")


def _report(
    summary: dict[str, Any],
    published: Published,
    demo_input: DemoInput,
    elapsed: float,
    crashed_at: int | None,
    exit_code: int,
) -> int:
    natural = len(demo_input.lines) - summary["unique_events"]
    expected_duplicates = published.total - published.poison - summary["unique_events"]
    checks = [
        ("effects equal the unique events", summary["effects"] == summary["unique_events"]),
        ("no event applied twice", summary["events_applied_twice"] == 0),
        ("duplicates skipped equal the copies", summary["key_duplicates"] == expected_duplicates),
        ("one row per quake", summary["quake_rows"] == summary["unique_quakes"]),
        ("every quake at its newest version", summary["stale_rows"] == 0),
        (
            "dead letters equal the broken events" if published.poison else "no dead letters",
            summary["dead_letters"] == published.poison,
        ),
        ("worker stopped cleanly on SIGTERM", exit_code == 0),
    ]
    rows = [
        ("messages read", published.total),
        ("  events in the input", len(demo_input.lines)),
        ("  redeliveries already in the feed", natural),
        ("  copies injected by the demo", published.injected_copies),
        ("  broken events injected by the demo", published.poison),
        ("unique events (idempotency keys)", summary["unique_events"]),
        ("duplicates skipped (same key)", summary["key_duplicates"]),
        ("duplicates skipped (same position)", summary["position_duplicates"]),
        ("effects written", summary["effects"]),
        ("quake rows", summary["quake_rows"]),
        ("dead letters", summary["dead_letters"]),
        ("worker crash (SIGKILL) after", "-" if crashed_at is None else f"{crashed_at} messages"),
        ("throughput while consuming", f"{published.total / max(elapsed, 1e-3):,.0f} messages/s ({elapsed:.2f} s)"),
    ]
    print()
    print("consumer demo summary")
    print("-" * 72)
    for label, value in rows:
        print(f"{label:<40} {value}")
    print("-" * 72)
    for label, passed in checks:
        print(f"{'OK  ' if passed else 'FAIL'} {label}")
    if published.poison:
        print(
            f"\ninspect the dead letters with: consumer dead-letters list --schema {DEMO_SCHEMA} --database-url URL"
            "\n(the embedded database is deleted when the demo ends; pass --database-url to keep it)"
        )
    return 0 if all(passed for _, passed in checks) else 1


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)
