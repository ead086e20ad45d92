"""The worker processes of a chaos run: start, signal, watch and stop ``python -m consumer run``.

Every process is started here through `WorkerProcess` and signalled by its
own PID only. Each worker slot (``w1``, ``w2`` ... for the base workers,
``x1``, ``x2`` ... for members that join and leave) keeps its PostgreSQL
``application_name`` (``chaos-w1``) across restarts, so the fault injector
can find its connections, and each incarnation writes its logs to a folder
of its own (``w1-3`` is the third start of ``w1``).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio

from tests.chaos.handler import HOOKS_FILE_VAR, WORKER_VAR
from tests.support.process import WorkerProcess

__all__ = ["HANDLER", "Cluster", "ClusterSettings", "LogSummary", "Slot", "Target", "run_command"]

HANDLER = "tests.chaos.handler:ChaosHandler"

SlotState = Literal["running", "stopped", "down", "leaving", "gone"]


@dataclass(frozen=True)
class Target:
    """Where the workers consume from and write to."""

    bootstrap: str
    database_url: str
    topic: str
    group_id: str


@dataclass(frozen=True)
class ClusterSettings:
    """Worker settings that shape how often faults land inside transactions and rebalances."""

    # Kafka's default minimum session timeout is 6 s; a frozen member is
    # evicted after it, and Tansu 0.6 responds to a new group's first JoinGroup
    # after half of it.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    max_poll_interval_s: float = 20.0
    max_batch_size: int = 25
    shutdown_timeout_s: float = 5.0
    revoke_timeout_s: float = 5.0
    retry_backoff_s: float = 0.2
    pool_max_size: int = 6


@dataclass
class Slot:
    """One worker slot and its current process."""

    name: str
    extra: bool
    state: SlotState = "down"
    process: WorkerProcess | None = None
    incarnation: int = 0
    log_dirs: list[Path] = field(default_factory=list)

    @property
    def application_name(self) -> str:
        return f"chaos-{self.name}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class LogSummary:
    """What the workers' JSON logs show, summed over every incarnation."""

    actions: Counter[str] = field(default_factory=Counter)
    # ERROR records other than dead letters, which the checker counts itself.
    errors: list[str] = field(default_factory=list)
    # Maximum number of failed batch transactions of one partition in a row.
    longest_failure_streak: int = 0
    tracebacks: int = 0


class Cluster:
    """Starts the worker slots and applies signals to them; `close` kills what still runs."""

    def __init__(
        self, target: Target, settings: ClusterSettings, *, log_dir: Path, hooks_file: Path, workers: int
    ) -> None:
        self.target = target
        self.settings = settings
        self.log_dir = log_dir
        self.hooks_file = hooks_file
        self.slots = [Slot(f"w{number}", extra=False) for number in range(1, workers + 1)]
        self._extras = 0
        # Exits the driver did not cause: (slot incarnation, exit code).
        self.unexpected_exits: list[tuple[str, int]] = []
        # Members that did not end within their shutdown timeout after SIGTERM,
        # or ended with a non-zero code.
        self.unclean_leaves: list[tuple[str, int | None]] = []

    def env(self, slot: Slot) -> dict[str, str]:
        """Return the environment of a worker in `slot`."""
        settings = self.settings
        return {
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": self.target.bootstrap,
            "CONSUMER_KAFKA__TOPICS": self.target.topic,
            "CONSUMER_KAFKA__GROUP_ID": self.target.group_id,
            "CONSUMER_KAFKA__CLIENT_ID": slot.application_name,
            "CONSUMER_KAFKA__SESSION_TIMEOUT_S": str(settings.session_timeout_s),
            "CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "CONSUMER_KAFKA__MAX_POLL_INTERVAL_S": str(settings.max_poll_interval_s),
            "CONSUMER_POSTGRES__DSN": self.target.database_url,
            "CONSUMER_POSTGRES__APPLICATION_NAME": slot.application_name,
            "CONSUMER_POSTGRES__POOL_MAX_SIZE": str(settings.pool_max_size),
            "CONSUMER_WORKER__MAX_BATCH_SIZE": str(settings.max_batch_size),
            "CONSUMER_WORKER__SHUTDOWN_TIMEOUT_S": str(settings.shutdown_timeout_s),
            "CONSUMER_WORKER__REVOKE_TIMEOUT_S": str(settings.revoke_timeout_s),
            "CONSUMER_WORKER__RETRY_BACKOFF_S": str(settings.retry_backoff_s),
            "CONSUMER_LOG__FORMAT": "json",
            HOOKS_FILE_VAR: str(self.hooks_file),
            WORKER_VAR: slot.name,
        }

    # -- slots -----------------------------------------------------------

    def start(self, slot: Slot) -> None:
        """Start a new incarnation of `slot`."""
        slot.incarnation += 1
        log_dir = self.log_dir / f"{slot.name}-{slot.incarnation}"
        slot.log_dirs.append(log_dir)
        slot.process = WorkerProcess.run(HANDLER, log_dir=log_dir, env=self.env(slot))
        slot.state = "running"

    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot)

    def add_extra(self) -> Slot:
        """Start a member that joins the group now, for the injector to SIGTERM later."""
        self._extras += 1
        slot = Slot(f"x{self._extras}", extra=True)
        self.slots.append(slot)
        self.start(slot)
        return slot

    def running(self, *, base_only: bool = False) -> list[Slot]:
        return [s for s in self.slots if s.state == "running" and s.alive and not (base_only and s.extra)]

    def extras_alive(self) -> list[Slot]:
        return [s for s in self.slots if s.extra and s.alive]

    async def kill(self, slot: Slot) -> None:
        """SIGKILL the slot's process and wait until it is reaped."""
        assert slot.process is not None
        slot.state = "down"
        slot.process.kill()
        await wait_for_exit(slot.process, timeout_s=10.0)

    def freeze(self, slot: Slot) -> None:
        assert slot.process is not None
        slot.state = "stopped"
        slot.process.stop_signal()

    def thaw(self, slot: Slot) -> None:
        if slot.state == "stopped" and slot.process is not None:
            slot.process.cont_signal()
            slot.state = "running"

    async def leave(self, slot: Slot) -> None:
        """SIGTERM the slot and wait for its graceful exit; SIGKILL it if the shutdown overruns."""
        assert slot.process is not None
        slot.state = "leaving"
        slot.process.terminate()
        allowed_s = self.settings.shutdown_timeout_s + 20.0
        code = await wait_for_exit(slot.process, timeout_s=allowed_s)
        if code is None:
            slot.process.kill()
            await wait_for_exit(slot.process, timeout_s=10.0)
        if code != 0:
            self.unclean_leaves.append((f"{slot.name}-{slot.incarnation}", code))
        slot.state = "gone"

    def check_exits(self) -> list[Slot]:
        """Record processes that exited while they should run; return their slots."""
        exited = [s for s in self.slots if s.state in ("running", "stopped") and not s.alive]
        for slot in exited:
            assert slot.process is not None
            code = slot.process.returncode
            assert code is not None
            self.unexpected_exits.append((f"{slot.name}-{slot.incarnation}", code))
            slot.state = "down"
        return exited

    async def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every live worker and return each incarnation's exit code (None: killed after a timeout)."""
        codes: dict[str, int | None] = {}
        for slot in self.slots:
            if slot.state == "stopped":
                self.thaw(slot)
        live = [s for s in self.slots if s.alive]
        for slot in live:
            assert slot.process is not None
            slot.process.terminate()
        for slot in live:
            assert slot.process is not None
            code = await wait_for_exit(slot.process, timeout_s=self.settings.shutdown_timeout_s + 20.0)
            if code is None:
                slot.process.kill()
            codes[f"{slot.name}-{slot.incarnation}"] = code
            slot.state = "gone"
        return codes

    def close(self) -> None:
        """Kill and reap every process still running; later calls do nothing."""
        for slot in self.slots:
            if slot.process is not None:
                if slot.state == "stopped":
                    slot.process.cont_signal()
                slot.process.close()

    # -- logs ------------------------------------------------------------

    def scan_logs(self) -> LogSummary:
        """Count log actions, ERROR records and tracebacks over every incarnation's output."""
        summary = LogSummary()
        for slot in self.slots:
            for log_dir in slot.log_dirs:
                for path in (log_dir / "stdout.log", log_dir / "stderr.log"):
                    if path.exists():
                        _scan_file(path, f"{log_dir.name}", summary)
        return summary


def _scan_file(path: Path, incarnation: str, summary: LogSummary) -> None:
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            if line.startswith("Traceback"):
                summary.tracebacks += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        action = record.get("action")
        if action:
            summary.actions[action] += 1
        if action == "batch_retry_scheduled":
            summary.longest_failure_streak = max(summary.longest_failure_streak, int(record.get("attempt", 0)))
        if record.get("level") == "ERROR" and action != "message_dead_lettered":
            summary.errors.append(f"{incarnation}: {record.get('message', '')[:300]}")


async def wait_for_exit(process: WorkerProcess, *, timeout_s: float) -> int | None:
    """Wait for `process` to exit without blocking the event loop; return its code, or None on timeout."""
    deadline = time.monotonic() + timeout_s
    while process.returncode is None:
        if time.monotonic() >= deadline:
            return None
        await anyio.sleep(0.05)
    return process.returncode


async def run_command(
    args: list[str], *, log_dir: Path, env: dict[str, str], timeout_s: float
) -> tuple[int | None, WorkerProcess]:
    """Run ``python -m consumer *args`` to the end; return its exit code (None: killed after `timeout_s`)."""
    process = WorkerProcess([sys.executable, "-m", "consumer", *args], log_dir=log_dir, env=env)
    code = await wait_for_exit(process, timeout_s=timeout_s)
    process.close()
    return code, process
