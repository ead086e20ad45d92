"""Subclasses of the lead scorer that the side-effect tests run, with fault hooks set through the environment.

``LEADS_TEST_HOOKS`` contains a JSON object keyed by event id:

- ``{"e-1": {"fail_after_step": 1}}``: raise RuntimeError after the step on
  the first call of the event (``-1`` on every call);
- ``{"e-1": {"sleep_after_step_s": 60}}``: on the first call of the event,
  sleep after the step returned, with the batch transaction open.

Each call of `score` is recorded in ``leads_test.handler_calls`` over a
separate autocommit connection (``CONSUMER_POSTGRES__DSN``), with the
derived keys the context returned, so rolled-back and killed calls count.

``LEADS_TEST_SCORED_TOPIC`` and ``LEADS_TEST_DEAD_LETTER_TOPIC`` replace the
topic names, so every test publishes to topics of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from consumer import Context
from examples.leads.handler import Lead, LeadScorer, Score

HOOKS_VAR = "LEADS_TEST_HOOKS"
SCORED_TOPIC_VAR = "LEADS_TEST_SCORED_TOPIC"
DEAD_LETTER_TOPIC_VAR = "LEADS_TEST_DEAD_LETTER_TOPIC"
MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATIONS_NAMESPACE = "leads-test"

RECORD_CALL = """
INSERT INTO leads_test.handler_calls (event_id, call, attempt, score_key, crm_key, "offset", pid)
SELECT $1, count(*) + 1, $2, $3, $4, $5, $6 FROM leads_test.handler_calls WHERE event_id = $1
RETURNING call
"""


class _SideChannel:
    """One autocommit connection per process for recording calls."""

    connection: asyncpg.Connection | None = None

    @classmethod
    async def get(cls) -> asyncpg.Connection:
        if cls.connection is None or cls.connection.is_closed():
            cls.connection = await asyncpg.connect(os.environ["CONSUMER_POSTGRES__DSN"])
        return cls.connection


def _hook(event_id: str) -> dict[str, Any]:
    hooks: dict[str, dict[str, Any]] = json.loads(os.environ.get(HOOKS_VAR, "{}"))
    return hooks.get(event_id, {})


async def _record_call(lead: Lead, context: Context) -> int:
    """Record this call with the context's derived keys; return its number for the event, from 1."""
    assert context.message is not None
    side = await _SideChannel.get()
    call: int = await side.fetchval(
        RECORD_CALL,
        lead.event_id,
        context.attempt,
        context.idempotency_key("score"),
        context.idempotency_key("crm"),
        context.message.offset,
        os.getpid(),
    )
    return call


async def _after_step(hook: dict[str, Any], call: int) -> None:
    if call == 1 and hook.get("sleep_after_step_s"):
        await anyio.sleep(float(hook["sleep_after_step_s"]))
    failures = int(hook.get("fail_after_step", 0))
    if failures < 0 or call <= failures:
        raise RuntimeError(f"fault hook: failing after the step on call {call}")


class HookedLeadScorer(LeadScorer):
    """`LeadScorer` with the fault hooks and topic names of the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.scored_topic = os.environ.get(SCORED_TOPIC_VAR, LeadScorer.scored_topic)
        self.dead_letter_topic = os.environ.get(DEAD_LETTER_TOPIC_VAR) or None

    async def score(self, lead: Lead, context: Context) -> Score:
        call = await _record_call(lead, context)
        score = await self.run_steps(lead, context)
        await _after_step(_hook(lead.event_id), call)
        return score

    async def run_steps(self, lead: Lead, context: Context) -> Score:
        return await super().score(lead, context)


class TwoScoresLeadScorer(HookedLeadScorer):
    """Runs step ``score`` twice per call, without an idempotency key, and keeps the first response.

    Without a key the service computes a new response for each request, so the
    two stored results differ unless the second call was wrongly served the
    first one's stored result.
    """

    async def run_steps(self, lead: Lead, context: Context) -> Score:
        first = await context.step("score", self.request_score, lead, {})
        await context.step("score", self.request_score, lead, {})
        return Score.model_validate(first)
