"""End-to-end latency at a fixed offered rate: send time of each record to the commit that covers it.

A `benchmarks.paced` subprocess produces to a fresh topic once the system
under test has joined its group. For the framework, a trigger on the
positions table sends each new position with NOTIFY. PostgreSQL delivers a
notification when the transaction that sent it commits, so the harness
stamps each one on arrival as the commit time. The baseline stamps its own
commits. A record's latency is the first commit time of its partition whose
next offset is past the record, minus the time the producer sent it.
"""

from __future__ import annotations

import bisect
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from benchmarks import drains
from benchmarks.framework import settings_for
from benchmarks.stream import Topic
from consumer import embedded
from consumer.handler import Handler
from consumer.worker import Worker

__all__ = ["Latency", "baseline_latency", "framework_latency"]

_REPO_ROOT = Path(__file__).resolve().parents[1]
# Stands in for the end offsets until the producer has finished.
_UNKNOWN_END = 2**62
RUN_TIMEOUT_S = 300.0


@dataclass
class Latency:
    """Latency percentiles of one run, in milliseconds."""

    messages: int
    offered_rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float


async def framework_latency(
    handler: Handler[Any], bootstrap_servers: str, database_url: str, *, rate: float, seconds: float
) -> Latency:
    topic = await _fresh_topic(bootstrap_servers)
    group_id = f"bench-{uuid.uuid4().hex[:12]}"
    worker = Worker(handler, settings_for(bootstrap_servers, database_url, topic.name, group_id))
    commits: list[tuple[int, int, float]] = []

    def on_notify(connection: Any, pid: int, channel: str, payload: str) -> None:
        partition, next_offset = payload.split()
        commits.append((int(partition), int(next_offset), time.time()))

    listener = await asyncpg.connect(database_url)
    await listener.add_listener("bench_positions", on_notify)
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(worker.run)
            with anyio.fail_after(RUN_TIMEOUT_S):
                # Polling: the worker and the listener have no event to wait on.
                while not worker.joined:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                sent = await _produce(bootstrap_servers, topic, rate, seconds)
                ends = _end_offsets(sent)
                while not _covered(commits, ends):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            worker.stop()
    finally:
        await listener.close()
    return _percentiles(sent, commits, rate)


async def baseline_latency(bootstrap_servers: str, database_url: str | None, *, rate: float, seconds: float) -> Latency:
    """Measure the baseline loop, or with `database_url` None the raw drain, which writes nothing."""
    topic = await _fresh_topic(bootstrap_servers)
    joined = anyio.Event()
    result: list[drains.Drained] = []

    async def consume() -> None:
        if database_url is None:
            result.append(await drains.raw_drain(bootstrap_servers, topic, ready=joined.set))
        else:
            result.append(await drains.baseline(bootstrap_servers, database_url, topic, ready=joined.set))

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(consume)
        with anyio.fail_after(RUN_TIMEOUT_S):
            await joined.wait()
            sent = await _produce(bootstrap_servers, topic, rate, seconds)
            # The baseline loop reads the end offsets on every fetch, so
            # filling them in lets it finish.
            topic.end_offsets.update(_end_offsets(sent))
    return _percentiles(sent, result[0].commits, rate)


async def _fresh_topic(bootstrap_servers: str) -> Topic:
    name = f"latency-{uuid.uuid4().hex[:8]}"
    await embedded.create_topic(bootstrap_servers, name, 4)
    return Topic(name, 4, 0, dict.fromkeys(range(4), _UNKNOWN_END), 0.0)


async def _produce(bootstrap_servers: str, topic: Topic, rate: float, seconds: float) -> list[tuple[int, int, float]]:
    """Run `benchmarks.paced` for `topic` and return its (partition, offset, send time) records."""
    with tempfile.NamedTemporaryFile(prefix="consumer-bench-", suffix=".jsonl", delete=False) as output:
        path = Path(output.name)
    command = [
        sys.executable, "-m", "benchmarks.paced",
        "--bootstrap-servers", bootstrap_servers,
        "--topic", topic.name,
        "--rate", str(rate),
        "--seconds", str(seconds),
        "--output", str(path),
    ]  # fmt: skip
    try:
        process = await anyio.run_process(command, cwd=_REPO_ROOT, check=False)
        if process.returncode != 0:
            raise RuntimeError(f"paced producer failed with {process.returncode}: {process.stderr.decode()[-2000:]}")
        text = await anyio.Path(path).read_text()
        return [tuple(json.loads(line)) for line in text.splitlines()]
    finally:
        await anyio.Path(path).unlink(missing_ok=True)


def _end_offsets(sent: list[tuple[int, int, float]]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for partition, offset, _ in sent:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def _covered(commits: list[tuple[int, int, float]], ends: dict[int, int]) -> bool:
    reached: dict[int, int] = {}
    for partition, next_offset, _ in commits:
        reached[partition] = max(reached.get(partition, 0), next_offset)
    return all(reached.get(partition, 0) >= end for partition, end in ends.items())


def _percentiles(sent: list[tuple[int, int, float]], commits: list[tuple[int, int, float]], rate: float) -> Latency:
    by_partition: dict[int, tuple[list[int], list[float]]] = {}
    for partition, next_offset, committed_at in sorted(commits, key=lambda commit: commit[2]):
        offsets, times = by_partition.setdefault(partition, ([], []))
        if not offsets or next_offset > offsets[-1]:
            offsets.append(next_offset)
            times.append(committed_at)
    latencies = []
    for partition, offset, sent_at in sent:
        offsets, times = by_partition[partition]
        latencies.append((times[bisect.bisect_right(offsets, offset)] - sent_at) * 1000)
    cuts = statistics.quantiles(latencies, n=100)
    return Latency(len(latencies), rate, round(cuts[49], 1), round(cuts[98], 1), round(max(latencies), 1))
