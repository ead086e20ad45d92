"""Workers as ``python -m consumer run`` subprocesses: resident memory under a backlog, and scale-out.

Each child gets its settings through the environment and logs JSON to a
file. The harness polls the positions table every `POLL_S`, reads the
children's logs for assignments, and samples each child's resident set
size (VmRSS in /proc/PID/status). Every child is stopped with SIGTERM, by
its PID, when its run ends or times out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg

from benchmarks.database import SCHEMA
from benchmarks.drains import SESSION_TIMEOUT_MS
from benchmarks.framework import reached_end, read_positions
from benchmarks.stream import Topic

__all__ = ["ProcessRun", "run_processes"]

POLL_S = 0.02
_STOP_TIMEOUT_S = 30.0
_REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ProcessRun:
    """Outcome of a set of worker processes draining one topic."""

    workers: int
    # Messages applied and seconds from the last assignment (a stable group) to the end.
    steady_messages: int
    steady_seconds: float
    # Seconds from the first child's start to its last assignment: joins and rebalances.
    settle_s: float
    finished: bool
    applied: int
    peak_rss_mib: list[float]
    # (seconds since start, RSS in MiB of the first child, messages applied) every second.
    rss_trace: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.steady_messages / self.steady_seconds if self.steady_seconds > 0 else 0.0


class _Child:
    """One ``consumer run`` subprocess and the assignments its log reports."""

    def __init__(self, handler: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            # The command is this interpreter with fixed arguments.
            self.process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "consumer", "run", handler, "--log-format", "json"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=_REPO_ROOT,
            )
        self._read = 0
        self.assigned: set[str] = set()
        self.peak_rss_kib = 0

    def read_assignments(self) -> bool:
        """Apply new assignment log lines; return True when the assignment changed."""
        with self.log_path.open("rb") as log:
            log.seek(self._read)
            text = log.read()
        complete = text.rfind(b"\n") + 1
        self._read += complete
        changed = False
        for line in text[:complete].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            action = record.get("action")
            if action not in ("partitions_assigned", "partitions_revoked"):
                continue
            partitions = {name.strip() for name in record["message"].split(":", 1)[1].split(",")}
            if action == "partitions_assigned":
                self.assigned |= partitions
            else:
                self.assigned -= partitions
            changed = True
        return changed

    def rss_kib(self) -> int:
        """Return VmRSS of the child in KiB, or 0 once it has exited."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                self.peak_rss_kib = max(self.peak_rss_kib, rss)
                return rss
        return 0

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def child_environment(bootstrap_servers: str, database_url: str, topic: str, group_id: str) -> dict[str, str]:
    """Return the environment of a child: this one without CONSUMER_ variables, plus the run's settings."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONSUMER_")}
    env.update(
        PYTHONPATH=str(_REPO_ROOT),
        CONSUMER_KAFKA__BOOTSTRAP_SERVERS=bootstrap_servers,
        CONSUMER_KAFKA__TOPICS=topic,
        CONSUMER_KAFKA__GROUP_ID=group_id,
        CONSUMER_KAFKA__SESSION_TIMEOUT_S=str(SESSION_TIMEOUT_MS / 1000),
        CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S=str(SESSION_TIMEOUT_MS / 3000),
        CONSUMER_POSTGRES__DSN=database_url,
        CONSUMER_POSTGRES__SCHEMA=SCHEMA,
        CONSUMER_POSTGRES__APPLICATION_NAME="bench-worker",
    )
    return env


async def run_processes(
    handler: str,
    workers: int,
    bootstrap_servers: str,
    database_url: str,
    topic: Topic,
    *,
    timeout_s: float,
) -> ProcessRun:
    """Run `workers` children of `handler` in one fresh group until `topic` is applied or `timeout_s` passes."""
    group_id = f"bench-{uuid.uuid4().hex[:12]}"
    env = child_environment(bootstrap_servers, database_url, topic.name, group_id)
    log_dir = Path(tempfile.mkdtemp(prefix="consumer-bench-"))
    observer = await asyncpg.connect(database_url)
    children = [_Child(handler, env, log_dir / f"worker-{index}.log") for index in range(workers)]
    try:
        return await _watch(children, observer, group_id, topic, timeout_s)
    finally:
        for child in children:
            child.stop()
        await observer.close()
        shutil.rmtree(log_dir, ignore_errors=True)


async def _watch(
    children: list[_Child], observer: asyncpg.Connection, group_id: str, topic: Topic, timeout_s: float
) -> ProcessRun:
    partitions = {f"{topic.name}-{partition}" for partition in range(topic.partitions)}
    started = time.monotonic()
    stable_at: float | None = None
    applied_at_stable = 0
    trace: list[tuple[float, float, int]] = []
    applied = 0
    finished = False
    while time.monotonic() - started < timeout_s:
        for child in children:
            if child.process.poll() is not None:
                raise RuntimeError(f"worker exited with {child.process.returncode}; log {child.log_path}")
        rss = [child.rss_kib() for child in children]
        positions = await read_positions(observer, group_id)
        applied = sum(positions.values())
        changed = [child.read_assignments() for child in children]
        now = time.monotonic()
        if any(changed) and _stable(children, partitions):
            stable_at, applied_at_stable = now, applied
        if not trace or now - started >= trace[-1][0] + 1.0:
            trace.append((round(now - started, 2), round(rss[0] / 1024, 1), applied))
        if reached_end(positions, topic):
            finished = True
            break
        await anyio.sleep(POLL_S)
    ended = time.monotonic()
    if stable_at is None:
        stable_at, applied_at_stable = started, 0
    return ProcessRun(
        workers=len(children),
        steady_messages=applied - applied_at_stable,
        steady_seconds=ended - stable_at,
        settle_s=stable_at - started,
        finished=finished,
        applied=applied,
        peak_rss_mib=[round(child.peak_rss_kib / 1024, 1) for child in children],
        rss_trace=trace,
    )


def _stable(children: list[_Child], partitions: set[str]) -> bool:
    """Return whether every partition has exactly one owner and every child owns one, when it can."""
    owned = [child.assigned for child in children]
    if sum(len(assigned) for assigned in owned) != len(partitions) or set().union(*owned) != partitions:
        return False
    return all(owned) or len(children) > len(partitions)
