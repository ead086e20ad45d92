"""The fault injector: picks faults and their moments from a seeded RNG for a bounded window.

Process and connection faults, one every `mean_interval_s` on average:

- ``sigkill``: SIGKILL a worker, start it again 0.5 to 3 s later;
- ``zombie``: SIGSTOP a worker for 1 to 4 s longer than the session
  timeout, then SIGCONT it. The group moves its partitions meanwhile, while
  the frozen worker still believes it owns them and may sit inside a
  transaction;
- ``pg_terminate``: ``pg_terminate_backend`` on a worker's connections, the
  ones inside a transaction when any appear within 2 s;
- ``join_leave``: start an extra member, SIGTERM it 5 to 20 s later.

Besides, ``replay`` runs ``consumer replay --to-earliest`` at evenly spaced
moments of the window while the other faults go on.

When the window ends, every pending recovery (restart, SIGCONT, SIGTERM of
an extra member) happens at once, so the run settles with all base workers
running.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import asyncpg

from tests.chaos.cluster import HANDLER, Cluster, Slot, run_command

__all__ = ["DEFAULT_WEIGHTS", "EventLog", "FaultPlan", "Injector"]

DEFAULT_WEIGHTS = {"sigkill": 0.25, "zombie": 0.2, "pg_terminate": 0.35, "join_leave": 0.2}

# Only sessions of this database and slot: the counting connection of the
# handler is named "<slot>-side" and is never matched.
_TERMINATE_IN_TRANSACTION = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND xact_start IS NOT NULL
"""
_TERMINATE_ALL = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
"""
# How long a connection kill waits for one of the worker's transactions, and how often it looks.
_TRANSACTION_WAIT_S = 2.0
_TRANSACTION_POLL_S = 0.01
_HIGH_WATER = "SELECT coalesce(sum(high_water), 0) FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2"

_REPLAY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class FaultPlan:
    """How long faults are injected, how often, and which kinds."""

    duration_s: float
    mean_interval_s: float = 2.0
    replays: int = 1
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))


class EventLog:
    """Timestamped lines of what the driver did, kept in memory and appended to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:8.2f}s {text}"
        self.lines.append(line)
        with self.path.open("a") as file:
            file.write(line + "\n")


class Injector:
    """Injects faults into `cluster` for `plan.duration_s` seconds; counts them by kind in `faults`."""

    def __init__(
        self, cluster: Cluster, rng: random.Random, plan: FaultPlan, *, events: EventLog, log_dir: Path
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.plan = plan
        self.events = events
        self.log_dir = log_dir
        self.faults: Counter[str] = Counter()
        # Connections terminated, and how many of them were inside a transaction.
        self.backends: Counter[str] = Counter()
        # Sum of the stored high-water marks when each replay started: about
        # how many offsets the replays brought back as position duplicates.
        self.replayed_offsets = 0
        # Replays that failed: (exit code, end of the output).
        self.replay_failures: list[tuple[int | None, str]] = []
        self._settle = anyio.Event()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._admin: asyncpg.Connection | None = None

    async def run(self) -> None:
        """Inject faults until the window ends, then carry out every pending recovery and return."""
        plan = self.plan
        end = time.monotonic() + plan.duration_s
        kinds = list(plan.weights)
        weights = [plan.weights[kind] for kind in kinds]
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                for number in range(1, plan.replays + 1):
                    task_group.start_soon(self._replay_after, plan.duration_s * number / (plan.replays + 1))
                while True:
                    gap = min(self.rng.expovariate(1 / plan.mean_interval_s), 4 * plan.mean_interval_s)
                    if time.monotonic() + gap >= end:
                        break
                    await anyio.sleep(gap)
                    await self._inject(self.rng.choices(kinds, weights)[0])
                await anyio.sleep(max(0.0, end - time.monotonic()))
                self.events.add("fault window over: settling")
                self._settle.set()
        finally:
            if self._admin is not None:
                await self._admin.close()

    async def watch(self) -> None:
        """Restart base workers that exited on their own; run until cancelled."""
        while True:
            for slot in self.cluster.check_exits():
                self.events.add(f"unexpected exit of {slot.name}-{slot.incarnation}: code {_code(slot)}")
                if not slot.extra:
                    self.cluster.start(slot)
                    self.events.add(f"restarted {slot.name} as {slot.name}-{slot.incarnation}")
            await anyio.sleep(0.5)

    # -- the faults ------------------------------------------------------------

    async def _inject(self, kind: str) -> None:
        cluster = self.cluster
        # Keep one base worker running, so the stream moves on between faults.
        base = cluster.running(base_only=True)
        candidates = cluster.running() if len(base) > 1 else [s for s in cluster.running() if s.extra]
        if kind == "sigkill" and candidates:
            await self._sigkill(self.rng.choice(candidates))
        elif kind == "zombie" and candidates:
            self._zombie(self.rng.choice(candidates))
        elif kind == "join_leave" and not cluster.extras_alive():
            self._join_leave()
        else:
            alive = [s for s in cluster.slots if s.alive]
            if alive:
                await self._pg_terminate(self.rng.choice(alive))

    async def _sigkill(self, slot: Slot) -> None:
        self.faults["sigkill"] += 1
        pid = _pid(slot)
        await self.cluster.kill(slot)
        self.events.add(f"sigkill {slot.name}-{slot.incarnation} (pid {pid})")

        async def restart() -> None:
            if slot.extra:
                slot.state = "gone"
                return
            self.cluster.start(slot)
            self.events.add(f"restarted {slot.name} as {slot.name}-{slot.incarnation} (pid {_pid(slot)})")

        self._later(self.rng.uniform(0.5, 3.0), restart)

    def _zombie(self, slot: Slot) -> None:
        self.faults["zombie"] += 1
        session_s = self.cluster.settings.session_timeout_s
        frozen_s = self.rng.uniform(session_s + 1.0, session_s + 4.0)
        self.cluster.freeze(slot)
        self.events.add(f"sigstop {slot.name}-{slot.incarnation} (pid {_pid(slot)}) for {frozen_s:.1f}s")

        async def thaw() -> None:
            self.cluster.thaw(slot)
            self.events.add(f"sigcont {slot.name}-{slot.incarnation}")

        self._later(frozen_s, thaw)

    def _join_leave(self) -> None:
        self.faults["join_leave"] += 1
        slot = self.cluster.add_extra()
        self.events.add(f"join {slot.name} (pid {_pid(slot)})")

        async def leave() -> None:
            # A frozen member is thawed first by its own pending SIGCONT.
            with anyio.move_on_after(15.0):
                while slot.state == "stopped":
                    await anyio.sleep(0.1)
            if slot.state != "running" or not slot.alive:
                return
            self.events.add(f"sigterm {slot.name}")
            await self.cluster.leave(slot)
            self.events.add(f"{slot.name} left with code {_code(slot)}")

        self._later(self.rng.uniform(5.0, 20.0), leave)

    async def _pg_terminate(self, slot: Slot) -> None:
        self.faults["pg_terminate"] += 1
        admin = await self._admin_connection()
        # Transactions last milliseconds unless a handler sleeps, so the
        # statement is repeated until it catches one or the wait is over.
        deadline = time.monotonic() + _TRANSACTION_WAIT_S
        terminated: int = 0
        while not terminated and time.monotonic() < deadline:
            terminated = await admin.fetchval(_TERMINATE_IN_TRANSACTION, slot.application_name)
            await anyio.sleep(_TRANSACTION_POLL_S)
        in_transaction = terminated > 0
        if not in_transaction:
            terminated = await admin.fetchval(_TERMINATE_ALL, slot.application_name)
        self.backends["terminated"] += terminated
        if in_transaction:
            self.backends["terminated_in_transaction"] += terminated
        where = "inside a transaction" if in_transaction else "outside transactions"
        self.events.add(f"pg_terminate {slot.name}-{slot.incarnation}: {terminated} connection(s) {where}")

    async def _replay_after(self, delay_s: float) -> None:
        with anyio.move_on_after(delay_s):
            await self._settle.wait()
        if self._settle.is_set():
            return
        target = self.cluster.target
        # A connection of its own: the injector's is busy with connection kills meanwhile.
        connection = await asyncpg.connect(target.database_url)
        try:
            high_water: int = await connection.fetchval(_HIGH_WATER, target.group_id, target.topic)
        finally:
            await connection.close()
        self.faults["replay"] += 1
        self.events.add(f"replay to earliest (stored high-water marks sum to {high_water})")
        env = {
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": target.bootstrap,
            "CONSUMER_KAFKA__GROUP_ID": target.group_id,
            "CONSUMER_POSTGRES__DSN": target.database_url,
        }
        args = ["replay", HANDLER, "--topic", target.topic, "--to-earliest", "--yes"]
        log_dir = self.log_dir / f"replay-{self.faults['replay']}"
        code, process = await run_command(args, log_dir=log_dir, env=env, timeout_s=_REPLAY_TIMEOUT_S)
        if code == 0:
            self.replayed_offsets += high_water
        else:
            self.replay_failures.append((code, process.output_tail()))
        self.events.add(f"replay ended with code {code}")

    # -- helpers -----------------------------------------------------------

    def _later(self, delay_s: float, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` after `delay_s` seconds, or as soon as the window is over."""

        async def wait_then_act() -> None:
            with anyio.move_on_after(delay_s):
                await self._settle.wait()
            await action()

        assert self._task_group is not None
        self._task_group.start_soon(wait_then_act)

    async def _admin_connection(self) -> asyncpg.Connection:
        if self._admin is None or self._admin.is_closed():
            self._admin = await asyncpg.connect(
                self.cluster.target.database_url, server_settings={"application_name": "chaos-driver"}
            )
        return self._admin


def _pid(slot: Slot) -> int | None:
    return slot.process.pid if slot.process is not None else None


def _code(slot: Slot) -> int | None:
    return slot.process.returncode if slot.process is not None else None
