"""Helpers of the side-effect tests: the lead example's deployment, its workers and the rows it writes.

Every test gets fresh topics (leads, lead.scored, dead letters), fresh
consumer groups and a fresh database, and a scoring service of its own on
127.0.0.1, so the counts a test asserts are its own.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from consumer import migrations
from examples.leads.scoring_service import ScoringService
from tests.side_effects import handlers
from tests.support import kafka
from tests.support.process import WorkerProcess

__all__ = [
    "COUNTER",
    "HOOKED_SCORER",
    "SCORER",
    "TWO_SCORES_SCORER",
    "LeadRows",
    "LeadsDeployment",
    "expected_key",
    "lead_record",
    "wait_until",
]

SCORER = "examples.leads.handler:LeadScorer"
COUNTER = "examples.leads.downstream:ScoredLeadCounter"
HOOKED_SCORER = "tests.side_effects.handlers:HookedLeadScorer"
TWO_SCORES_SCORER = "tests.side_effects.handlers:TwoScoresLeadScorer"

STARTED_LINE = "worker started:"
ASSIGNED_LINE = "partitions assigned:"

# The smallest session timeout Kafka accepts by default, so a killed member
# is evicted within seconds and its partitions move to the restarted worker.
SESSION_TIMEOUT_S = 6
HEARTBEAT_INTERVAL_S = 1

# Short retry delays keep a test's retries within its time budget.
FAST_WORKER = {
    "worker__max_attempts": 3,
    "worker__retry_backoff_s": 0.05,
    "worker__retry_backoff_max_s": 0.2,
    "worker__poll_timeout_s": 0.1,
}


def lead_record(event_id: str, lead_id: str | None = None, *, employees: int = 250) -> kafka.Record:
    """Build a lead event whose Kafka key is the lead id."""
    lead_id = lead_id or f"lead-{event_id}"
    value = {
        "event_id": event_id,
        "lead_id": lead_id,
        "email": f"{lead_id}@example.com",
        "company": f"Company of {lead_id}",
        "employees": employees,
        "source": "signup",
    }
    return kafka.Record(key=lead_id.encode(), value=json.dumps(value).encode())


def expected_key(dedup_scope: str, message_key: str, name: str) -> str:
    """Compute a derived key as docs/side-effects.md states it, independently of the framework's code."""
    return hashlib.sha256(f"{dedup_scope}\x1f{message_key}\x1f{name}".encode()).hexdigest()


async def wait_until(
    predicate: Callable[[], Any], *, timeout_s: float = 30.0, description: str, interval_s: float = 0.1
) -> Any:
    """Await ``predicate()`` until it returns a truthy value and return that value.

    Raises AssertionError with `description` and the last value after `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {description}; last value: {result!r}")
        await anyio.sleep(interval_s)


@dataclass
class LeadsDeployment:
    """The lead scorer and its downstream counter over one database, their topics and the scoring service."""

    bootstrap: str
    database_url: str
    leads_topic: str
    scored_topic: str
    dead_letter_topic: str
    service: ScoringService
    start_process: Callable[..., WorkerProcess]
    log_dir: Path
    scorer_group: str = field(default_factory=lambda: f"lead-scorer-{uuid.uuid4().hex[:10]}")
    counter_group: str = field(default_factory=lambda: f"lead-counter-{uuid.uuid4().hex[:10]}")

    def _base_env(self, topic: str, group_id: str, settings: Mapping[str, object]) -> dict[str, str]:
        env = {
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "CONSUMER_KAFKA__TOPICS": topic,
            "CONSUMER_KAFKA__GROUP_ID": group_id,
            "CONSUMER_KAFKA__SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
            "CONSUMER_KAFKA__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
            "CONSUMER_POSTGRES__DSN": self.database_url,
        }
        for setting, value in {**FAST_WORKER, **settings}.items():
            env[f"CONSUMER_{setting.upper()}"] = str(value)
        return env

    def scorer_env(self, *, hooks: Mapping[str, Any] | None = None, **settings: object) -> dict[str, str]:
        """Return a scorer worker's environment; ``settings`` are named like ``worker__max_attempts``."""
        env = self._base_env(self.leads_topic, self.scorer_group, settings)
        env["LEAD_SCORER_URL"] = self.service.url
        env[handlers.HOOKS_VAR] = json.dumps(dict(hooks or {}))
        env[handlers.SCORED_TOPIC_VAR] = self.scored_topic
        env[handlers.DEAD_LETTER_TOPIC_VAR] = self.dead_letter_topic
        return env

    def start_scorer(
        self, *, handler: str = HOOKED_SCORER, hooks: Mapping[str, Any] | None = None, **settings: object
    ) -> WorkerProcess:
        """Start ``consumer run`` with a lead scorer on the test's leads topic."""
        return self.start_process(handler, env=self.scorer_env(hooks=hooks, **settings))

    def start_counter(self, **settings: object) -> WorkerProcess:
        """Start ``consumer run`` with the downstream counter on the test's lead.scored topic."""
        return self.start_process(COUNTER, env=self._base_env(self.scored_topic, self.counter_group, settings))

    async def migrate(self) -> None:
        """Apply the framework's and the example's migrations with ``consumer migrate``, then the tests' own."""
        command = [sys.executable, "-m", "consumer", "migrate", "--handler", SCORER, "--handler", COUNTER]
        env = {"CONSUMER_POSTGRES__DSN": self.database_url}
        with WorkerProcess(command, log_dir=self.log_dir / "migrate", env=env) as process:
            exit_code = await anyio.to_thread.run_sync(lambda: process.wait(60.0))
            assert exit_code == 0, f"consumer migrate failed with exit code {exit_code}\n{process.output_tail()}"
        connection = await asyncpg.connect(self.database_url)
        try:
            await migrations.migrate(
                connection, "consumer", handlers.MIGRATIONS_NAMESPACE, migrations.discover(handlers.MIGRATIONS)
            )
        finally:
            await connection.close()

    async def produce(self, records: Iterable[kafka.Record], topic: str | None = None) -> list[int]:
        """Produce `records` to the leads topic (or `topic`) in order; return their offsets."""
        return await kafka.produce(self.bootstrap, topic or self.leads_topic, records)

    async def read_topic(self, topic: str, count: int, *, timeout_s: float = 30.0) -> list[kafka.ConsumedRecord]:
        """Read `count` records of `topic` from the start, in a throwaway group."""
        return await kafka.consume(
            self.bootstrap, topic, group_id=f"reader-{uuid.uuid4().hex[:10]}", count=count, timeout_s=timeout_s
        )


class LeadRows:
    """Reads the example's, the framework's and the test handlers' tables over one connection."""

    def __init__(self, connection: asyncpg.Connection, deployment: LeadsDeployment) -> None:
        self.connection = connection
        self.deployment = deployment

    @classmethod
    async def open(cls, deployment: LeadsDeployment) -> LeadRows:
        return cls(await asyncpg.connect(deployment.database_url), deployment)

    async def close(self) -> None:
        await self.connection.close()

    async def lead_scores(self) -> dict[str, asyncpg.Record]:
        """Return the CRM rows by lead id."""
        rows = await self.connection.fetch("SELECT * FROM crm.lead_scores")
        return {row["lead_id"]: row for row in rows}

    async def scored_events(self) -> list[asyncpg.Record]:
        """Return the downstream counter's rows, in insertion order."""
        return await self.connection.fetch("SELECT * FROM crm.scored_events ORDER BY received_at")

    async def handler_calls(self, event_id: str | None = None) -> list[asyncpg.Record]:
        """Return the recorded calls of `score`, optionally of one event, in call order."""
        return await self.connection.fetch(
            "SELECT * FROM leads_test.handler_calls WHERE $1::text IS NULL OR event_id = $1 ORDER BY seq", event_id
        )

    async def step_results(self, idempotency_key: str | None = None) -> list[asyncpg.Record]:
        """Return the scorer's stored step results, optionally of one message, by key, step and call number."""
        return await self.connection.fetch(
            "SELECT * FROM consumer.step_results WHERE dedup_scope = $1 AND ($2::text IS NULL OR idempotency_key = $2)"
            " ORDER BY idempotency_key, step_name, call_number",
            self.deployment.scorer_group,
            idempotency_key,
        )

    async def outbox(self) -> list[asyncpg.Record]:
        """Return the scorer's outbox rows in id order."""
        return await self.connection.fetch(
            "SELECT * FROM consumer.outbox WHERE dedup_scope = $1 ORDER BY id", self.deployment.scorer_group
        )

    async def position(self, group_id: str, topic: str) -> asyncpg.Record | None:
        """Return the positions row of partition 0 of `topic` under `group_id`."""
        return await self.connection.fetchrow(
            "SELECT * FROM consumer.positions WHERE dedup_scope = $1 AND topic = $2 AND partition = 0",
            group_id,
            topic,
        )

    async def next_offset(self, group_id: str, topic: str) -> int | None:
        row = await self.position(group_id, topic)
        return None if row is None else int(row["next_offset"])
