"""One chaos run: migrate, start the workers, publish the stream while faults land, drain, check.

`run` needs a Kafka cluster, an empty database and a topic with
`ChaosConfig.partitions` partitions. It creates nothing else outside its
log folder, and it stops every process it started before it returns.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tests.chaos import checker
from tests.chaos.cluster import HANDLER, Cluster, ClusterSettings, Target, run_command
from tests.chaos.faults import EventLog, FaultPlan, Injector
from tests.chaos.stream import Stream, StreamShape, plan_stream
from tests.support.process import WorkerProcess

__all__ = ["ChaosConfig", "run"]

_STARTUP_TIMEOUT_S = 90.0
_SEND_ATTEMPTS = 5

_POSITIONS = "SELECT partition, next_offset FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2"
_UNSENT = "SELECT count(*) FROM consumer.outbox WHERE dedup_scope = $1 AND sent_at IS NULL"


@dataclass(frozen=True)
class ChaosConfig:
    """Everything a run draws from its seed, and the bounds of its time."""

    seed: int
    # Length of the fault window, in seconds; the stream is published over
    # its first `publish_share`.
    duration_s: float
    messages: int
    workers: int = 3
    partitions: int = 4
    mean_fault_interval_s: float = 2.0
    replays: int = 1
    publish_share: float = 0.8
    # Time allowed after the window for the positions to reach the end offsets.
    drain_timeout_s: float = 120.0
    fault_weights: dict[str, float] | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def shape(self) -> StreamShape:
        return StreamShape(messages=self.messages, partitions=self.partitions)

    def fault_plan(self) -> FaultPlan:
        plan = FaultPlan(duration_s=self.duration_s, mean_interval_s=self.mean_fault_interval_s, replays=self.replays)
        if self.fault_weights is not None:
            plan = FaultPlan(plan.duration_s, plan.mean_interval_s, plan.replays, dict(self.fault_weights))
        return plan


async def run(config: ChaosConfig, *, bootstrap: str, database_url: str, topic: str, log_dir: Path) -> checker.Report:
    """Run the chaos scenario of `config` against `topic` and return the checked report."""
    started = time.monotonic()
    revision_at_start = checker.revision()
    log_dir.mkdir(parents=True, exist_ok=True)
    # Separate generators keep the stream the same when only the fault settings change.
    stream = plan_stream(random.Random(f"stream-{config.seed}"), config.shape())
    hooks_file = log_dir / "hooks.json"
    hooks_file.write_text(stream.hooks.to_json())
    target = Target(bootstrap, database_url, topic, group_id=f"group-{topic}")
    events = EventLog(log_dir / "events.log")
    events.add(f"seed {config.seed}: {len(stream.keys)} messages, {len(stream.records)} records, topic {topic}")

    await _migrate(target, log_dir)
    cluster = Cluster(target, config.cluster, log_dir=log_dir, hooks_file=hooks_file, workers=config.workers)
    injector = Injector(
        cluster, random.Random(f"faults-{config.seed}"), config.fault_plan(), events=events, log_dir=log_dir
    )
    try:
        cluster.start_all()
        await _wait_for_assignment(cluster)
        events.add("group formed: fault window starts")
        end_offsets, drain_s = await _publish_inject_drain(config, stream, cluster, injector, events)
        report = await checker.check(
            target,
            stream,
            end_offsets,
            injector=injector,
            cluster=cluster,
            drain_s=drain_s,
            seed=config.seed,
        )
        report.exit_codes = await cluster.stop_all()
        events.add(f"workers stopped: {report.exit_codes}")
    finally:
        cluster.close()
    report.finish(cluster, wall_s=time.monotonic() - started, log_dir=log_dir, revision_at_start=revision_at_start)
    (log_dir / "report.txt").write_text(report.table())
    return report


async def _migrate(target: Target, log_dir: Path) -> None:
    env = {"CONSUMER_POSTGRES__DSN": target.database_url}
    code, process = await run_command(
        ["migrate", "--handler", HANDLER], log_dir=log_dir / "migrate", env=env, timeout_s=60.0
    )
    if code != 0:
        raise AssertionError(f"consumer migrate failed with exit code {code}\n{process.output_tail()}")


async def _wait_for_assignment(cluster: Cluster) -> None:
    """Wait until some worker has been assigned partitions, so the first faults hit a formed group."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    while not any(_assigned(slot.process) for slot in cluster.slots):
        for slot in cluster.slots:
            if slot.process is not None and slot.process.returncode is not None:
                raise AssertionError(f"worker {slot.name} exited at start\n{slot.process.output_tail()}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"no worker was assigned partitions within {_STARTUP_TIMEOUT_S:.0f}s")
        await anyio.sleep(0.2)


def _assigned(process: WorkerProcess | None) -> bool:
    return process is not None and "partitions assigned" in process.output()


async def _publish_inject_drain(
    config: ChaosConfig, stream: Stream, cluster: Cluster, injector: Injector, events: EventLog
) -> tuple[dict[int, int], float | None]:
    """Publish and inject faults side by side, then wait for the drain; return the end offsets and drain time."""
    end_offsets: dict[int, int] = {}
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(injector.watch)

        async def publish() -> None:
            end_offsets.update(await _publish(cluster.target, stream, config.duration_s * config.publish_share))
            events.add(f"stream published: end offsets {dict(sorted(end_offsets.items()))}")

        async with anyio.create_task_group() as window:
            window.start_soon(publish)
            window.start_soon(injector.run)
        drain_s = await _wait_for_drain(cluster.target, end_offsets, config.drain_timeout_s)
        events.add(f"drained in {drain_s:.1f}s" if drain_s is not None else "not drained within the timeout")
        task_group.cancel_scope.cancel()
    return end_offsets, drain_s


async def _publish(target: Target, stream: Stream, window_s: float) -> dict[int, int]:
    """Send the stream's records evenly over `window_s`, one request each; return the end offset per partition."""
    # NOTE: Tansu 0.6 rejects InitProducerId, so idempotence is off. Each
    # record gets its own request, because after a multi-record batch Tansu
    # 0.6 reported a wrong latest offset. The end offsets come from the
    # produce responses instead of ListOffsets.
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    end_offsets: dict[int, int] = {}
    interval_s = window_s / max(len(stream.records), 1)
    started = time.monotonic()
    try:
        for index, record in enumerate(stream.records):
            delay_s = started + index * interval_s - time.monotonic()
            if delay_s > 0:
                await anyio.sleep(delay_s)
            offset = await _send(producer, target.topic, record.partition, record.key, record.value)
            end_offsets[record.partition] = max(end_offsets.get(record.partition, 0), offset + 1)
    finally:
        await producer.stop()
    return end_offsets


async def _send(producer: AIOKafkaProducer, topic: str, partition: int, key: str, value: bytes) -> int:
    for attempt in range(1, _SEND_ATTEMPTS + 1):
        try:
            metadata = await producer.send_and_wait(
                topic, value=value, key=key.encode(), partition=partition, headers=[("Idempotency-Key", key.encode())]
            )
            return int(metadata.offset)
        except KafkaError:
            # NOTE: a send that timed out may still have been written. Such a
            # copy is an extra producer duplicate, which neither the end
            # offsets nor the expected key-duplicate count include.
            if attempt == _SEND_ATTEMPTS:
                raise
            await anyio.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


async def _wait_for_drain(target: Target, end_offsets: dict[int, int], timeout_s: float) -> float | None:
    """Wait until every stored position equals its end offset and the outbox is empty; return the seconds waited."""
    started = time.monotonic()
    connection = await asyncpg.connect(target.database_url)
    try:
        while time.monotonic() - started < timeout_s:
            rows = await connection.fetch(_POSITIONS, target.group_id, target.topic)
            positions = {row["partition"]: row["next_offset"] for row in rows}
            unsent: int = await connection.fetchval(_UNSENT, target.group_id)
            if all(positions.get(p, 0) == end for p, end in end_offsets.items()) and unsent == 0:
                return time.monotonic() - started
            await anyio.sleep(1.0)
    finally:
        await connection.close()
    return None
