"""The checks after a chaos run, and the table that reports them.

Checked against the database once the stream is drained, with the workers
still running:

- every logical message that does not always fail has exactly one effect
  row, and no other key has one;
- every always-failing message has exactly one dead letter, with reason
  ``permanent``, and no other message has one;
- every stored position equals the end offset the producer got back;
- the running totals of ``positions`` add up: applied = messages that do
  not always fail, dead-lettered = always-failing messages,
  key duplicates = producer duplicates;
- ``inbox`` contains one claim per logical key, ``applied`` or ``dead_lettered``;
- no worker exited on its own, every member left cleanly on SIGTERM, and
  every replay succeeded.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tests.chaos.cluster import Cluster, LogSummary, Target
from tests.chaos.faults import Injector
from tests.chaos.stream import Stream
from tests.support.process import REPO_ROOT

__all__ = ["Report", "Violation", "check", "revision"]

# Examples listed per kind of violation; the count is always complete.
_EXAMPLES = 10

_EFFECTS = """
SELECT idem_key, count(*) AS n,
       array_agg(format('%s-%s@%s by %s (backend %s, xid %s, %s)', topic, partition, "offset", worker,
                        backend_pid, xid, created_at) ORDER BY seq) AS rows
FROM chaos_app.effects GROUP BY idem_key
"""
_DEAD_LETTERS = """
SELECT idempotency_key, count(*) AS n, array_agg(reason) AS reasons, array_agg(status) AS statuses
FROM consumer.dead_letters WHERE dedup_scope = $1 AND topic = $2 GROUP BY idempotency_key
"""
_POSITIONS = """
SELECT partition, next_offset, high_water, applied, position_duplicates, key_duplicates, dead_lettered
FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2 ORDER BY partition
"""
_INBOX = "SELECT status, count(*) AS n FROM consumer.inbox WHERE dedup_scope = $1 GROUP BY status"
_INBOX_KEYS = "SELECT idempotency_key FROM consumer.inbox WHERE dedup_scope = $1"
_INVOCATIONS = "SELECT idem_key, count(*) AS n FROM chaos_app.invocations GROUP BY idem_key"


@dataclass(frozen=True)
class Violation:
    """One broken promise, with the evidence to start a diagnosis."""

    kind: str
    detail: str


@dataclass
class Report:
    """What a run injected, what the database shows, and what is wrong."""

    seed: int
    messages: int
    records: int
    permanent: int
    faults: Counter[str]
    handler_faults: Counter[str]
    backends: Counter[str]
    totals: dict[str, int]
    replayed_offsets: int
    effect_rows: int
    handler_calls: int
    dead_letters: int
    drain_s: float | None
    violations: list[Violation] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    logs: LogSummary = field(default_factory=LogSummary)
    wall_s: float = 0.0
    log_dir: Path | None = None
    # Commit of the code under test when the run started and when it ended,
    # with "-dirty" when the work tree had changes. Every worker start loads
    # the code on disk, so the two differ when the code changed meanwhile.
    revision_at_start: str = ""
    revision: str = ""

    @property
    def injected(self) -> int:
        return sum(self.faults.values()) + sum(self.handler_faults.values())

    def finish(self, cluster: Cluster, *, wall_s: float, log_dir: Path, revision_at_start: str) -> None:
        """Add what is known only after the workers stopped: exit codes and their logs."""
        self.wall_s = wall_s
        self.log_dir = log_dir
        self.revision_at_start = revision_at_start
        self.revision = revision()
        self.logs = cluster.scan_logs()
        for incarnation, code in self.exit_codes.items():
            if code != 0:
                self.violations.append(Violation("unclean_shutdown", f"{incarnation} exited with {code} on SIGTERM"))
        for incarnation, leave_code in cluster.unclean_leaves:
            self.violations.append(Violation("unclean_shutdown", f"{incarnation} left with {leave_code} on SIGTERM"))

    def table(self) -> str:
        """Format the report as the text table printed after a run."""
        code = self.revision
        if self.revision_at_start != self.revision:
            code = f"{self.revision_at_start} at the start, {self.revision} at the end"
        lines = [
            f"chaos run: seed {self.seed}, wall time {self.wall_s:.0f}s, code {code}",
            f"log folder {self.log_dir}",
        ]
        lines += _section("faults injected", [*self.faults.items(), *self.handler_faults.items()])
        lines.append(f"  {'total':<42} {self.injected:>8}")
        lines += _section(
            "connections terminated",
            [
                ("all", self.backends["terminated"]),
                ("inside a transaction", self.backends["terminated_in_transaction"]),
            ],
        )
        lines += _section(
            "messages",
            [
                ("logical messages", self.messages),
                ("records produced", self.records),
                ("producer duplicates", self.records - self.messages),
                ("always failing (expected dead letters)", self.permanent),
                ("effect rows", self.effect_rows),
                ("handler calls", self.handler_calls),
                ("dead letters", self.dead_letters),
            ],
        )
        lines += _section(
            "skipped and applied (positions totals)",
            [
                ("applied", self.totals["applied"]),
                ("duplicates skipped: key", self.totals["key_duplicates"]),
                ("duplicates skipped: position", self.totals["position_duplicates"]),
                ("  of which replayed offsets (estimate)", self.replayed_offsets),
                ("dead-lettered", self.totals["dead_lettered"]),
            ],
        )
        logs = self.logs
        lines += _section(
            "worker logs",
            [
                ("handler retries", logs.actions["message_retry_scheduled"]),
                ("batch transaction retries", logs.actions["batch_retry_scheduled"]),
                ("longest failure streak (3+ is halted)", logs.longest_failure_streak),
                ("partition assignments logged", logs.actions["partitions_assigned"]),
                ("replays followed", logs.actions["replay_followed"]),
                ("revocation timeouts", logs.actions["revoke_timeout"]),
                ("ERROR records other than dead letters", len(logs.errors)),
            ],
        )
        drained = f"{self.drain_s:.1f}s" if self.drain_s is not None else "no"
        lines += ["", f"drained after the window: {drained}", f"violations: {len(self.violations)}"]
        for kind, count in Counter(v.kind for v in self.violations).items():
            lines.append(f"  {kind}: {count}")
            lines += [f"    {v.detail}" for v in self.violations if v.kind == kind][:_EXAMPLES]
        return "\n".join(lines)


def revision() -> str:
    """Return the commit of the work tree, with "-dirty" when it has uncommitted changes."""
    result = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


def _section(title: str, rows: list[tuple[str, int]]) -> list[str]:
    return ["", title, *[f"  {name:<42} {value:>8}" for name, value in rows]]


async def check(
    target: Target,
    stream: Stream,
    end_offsets: dict[int, int],
    *,
    injector: Injector,
    cluster: Cluster,
    drain_s: float | None,
    seed: int,
) -> Report:
    """Read the outcome of a run from the database and compare it with what was produced."""
    connection = await asyncpg.connect(target.database_url)
    try:
        effects = {row["idem_key"]: row for row in await connection.fetch(_EFFECTS)}
        dead = {
            row["idempotency_key"]: row for row in await connection.fetch(_DEAD_LETTERS, target.group_id, target.topic)
        }
        positions = await connection.fetch(_POSITIONS, target.group_id, target.topic)
        inbox = {row["status"]: row["n"] for row in await connection.fetch(_INBOX, target.group_id)}
        inbox_keys = {row["idempotency_key"] for row in await connection.fetch(_INBOX_KEYS, target.group_id)}
        calls = {row["idem_key"]: row["n"] for row in await connection.fetch(_INVOCATIONS)}
    finally:
        await connection.close()

    permanent = stream.hooks.permanent
    totals = {
        name: sum(row[name] for row in positions)
        for name in ("applied", "key_duplicates", "position_duplicates", "dead_lettered")
    }
    report = Report(
        seed=seed,
        messages=len(stream.keys),
        records=len(stream.records),
        permanent=len(permanent),
        faults=Counter(injector.faults),
        handler_faults=_handler_faults(stream, calls),
        backends=Counter(injector.backends),
        totals=totals,
        replayed_offsets=injector.replayed_offsets,
        effect_rows=sum(row["n"] for row in effects.values()),
        handler_calls=sum(calls.values()),
        dead_letters=sum(row["n"] for row in dead.values()),
        drain_s=drain_s,
    )
    violations = report.violations
    violations += _check_effects(stream, effects)
    violations += _check_dead_letters(stream, dead)
    violations += _check_positions(positions, end_offsets, drain_s)
    violations += _check_totals(stream, totals)
    violations += _check_inbox(stream, inbox, inbox_keys)
    violations += _check_processes(cluster, injector)
    return report


def _handler_faults(stream: Stream, calls: dict[str, int]) -> Counter[str]:
    """Count the handler faults that fired: first calls of transient keys, every call of the others."""
    hooks = stream.hooks
    return Counter(
        {
            "handler_transient": sum(1 for key in hooks.transient if calls.get(key, 0) > 0),
            "handler_permanent": sum(calls.get(key, 0) for key in hooks.permanent),
            "handler_sleep": sum(calls.get(key, 0) for key in [*hooks.sleep_before_s, *hooks.sleep_after_s]),
        }
    )


def _check_effects(stream: Stream, effects: dict[str, asyncpg.Record]) -> list[Violation]:
    found: list[Violation] = []
    for key in stream.keys:
        row = effects.get(key)
        if row is None:
            if key not in stream.hooks.permanent:
                found.append(Violation("missing_effect", key))
        elif key in stream.hooks.permanent:
            found.append(Violation("effect_of_failed_message", f"{key}: {list(row['rows'])}"))
        elif row["n"] > 1:
            found.append(Violation("duplicate_effect", f"{key} x{row['n']}: {list(row['rows'])}"))
    known = set(stream.keys)
    found += [Violation("unexpected_effect", key) for key in effects if key not in known]
    return found


def _check_dead_letters(stream: Stream, dead: dict[str | None, asyncpg.Record]) -> list[Violation]:
    found: list[Violation] = []
    for key in sorted(stream.hooks.permanent):
        row = dead.get(key)
        if row is None:
            found.append(Violation("missing_dead_letter", key))
        elif row["n"] != 1 or list(row["reasons"]) != ["permanent"] or list(row["statuses"]) != ["dead"]:
            found.append(
                Violation(
                    "wrong_dead_letter", f"{key}: {row['n']} rows, {list(row['reasons'])} {list(row['statuses'])}"
                )
            )
    for dead_key, row in dead.items():
        if dead_key not in stream.hooks.permanent:
            found.append(Violation("unexpected_dead_letter", f"{dead_key}: {list(row['reasons'])}"))
    return found


def _check_positions(
    positions: list[asyncpg.Record], end_offsets: dict[int, int], drain_s: float | None
) -> list[Violation]:
    stored = {row["partition"]: row["next_offset"] for row in positions}
    found = [
        Violation("position_not_at_end", f"partition {p}: stored {stored.get(p)}, end offset {end}")
        for p, end in sorted(end_offsets.items())
        if stored.get(p, 0) != end
    ]
    found += [
        Violation("position_past_end", f"partition {p}: stored {offset}, nothing produced there")
        for p, offset in stored.items()
        if p not in end_offsets and offset != 0
    ]
    if drain_s is None:
        found.append(Violation("not_drained", "positions did not reach the end offsets within the drain timeout"))
    return found


def _check_totals(stream: Stream, totals: dict[str, int]) -> list[Violation]:
    expected = {
        "applied": len(stream.keys) - len(stream.hooks.permanent),
        "dead_lettered": len(stream.hooks.permanent),
        "key_duplicates": stream.duplicates,
    }
    return [
        Violation("wrong_total", f"positions.{name}: {totals[name]}, expected {value}")
        for name, value in expected.items()
        if totals[name] != value
    ]


def _check_inbox(stream: Stream, inbox: dict[str, int], inbox_keys: set[str]) -> list[Violation]:
    expected = {"applied": len(stream.keys) - len(stream.hooks.permanent), "dead_lettered": len(stream.hooks.permanent)}
    found: list[Violation] = []
    if inbox != {status: count for status, count in expected.items() if count}:
        found.append(Violation("wrong_inbox", f"claims by status {inbox}, expected {expected}"))
    missing = set(stream.keys) - inbox_keys
    if missing:
        found.append(Violation("wrong_inbox", f"{len(missing)} keys without a claim, e.g. {sorted(missing)[:5]}"))
    return found


def _check_processes(cluster: Cluster, injector: Injector) -> list[Violation]:
    found = [
        Violation("worker_exited", f"{incarnation} exited by itself with code {code}")
        for incarnation, code in cluster.unexpected_exits
    ]
    found += [
        Violation("worker_not_running", f"{slot.name}-{slot.incarnation} is {slot.state}")
        for slot in cluster.slots
        if not slot.extra and not (slot.state == "running" and slot.alive)
    ]
    found += [Violation("replay_failed", f"exit code {code}: {tail[-600:]}") for code, tail in injector.replay_failures]
    return found
