"""Score each new sales lead with a remote scoring API, keep the score in the CRM, and announce it.

A message of topic ``leads`` is one lead event (`Lead`), deduplicated on its
``event_id``. For each event the handler:

1. requests a score from the scoring service inside ``context.step("score", ...)``,
   with ``context.idempotency_key("score")`` as the ``Idempotency-Key``
   header. The step commits the response as soon as it arrives, so a retry, a
   rollback or a redelivery of the event reuses it. The key covers the one
   window the step leaves open: if the worker dies after the service
   responded but before the response was stored, the next run sends the same
   key and the service returns the response it stored.
2. upserts the score into ``crm.lead_scores`` through ``context.connection``,
   in the batch transaction;
3. publishes a `ScoredLead` to ``lead.scored`` through the outbox, in the
   same transaction, keyed by lead id. The relay sends it after the commit,
   at least once, with an ``Idempotency-Key`` header that a consumer built
   on this framework (`examples.leads.downstream`) deduplicates on.

The scoring service's base URL comes from the LEAD_SCORER_URL variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import pydantic

from consumer import Context, Handler, Message, PermanentError, http
from consumer.errors import ConfigurationError

__all__ = ["SCORER_URL_VAR", "Lead", "LeadScorer", "Score", "ScoredLead"]

SCORER_URL_VAR = "LEAD_SCORER_URL"
# Time limit of one scoring request, in seconds. A timeout is retried like any failed attempt.
SCORING_TIMEOUT_S = 10.0

UPSERT_SCORE = """
INSERT INTO crm.lead_scores (lead_id, email, company, score, model, event_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (lead_id) DO UPDATE
SET email = EXCLUDED.email,
    company = EXCLUDED.company,
    score = EXCLUDED.score,
    model = EXCLUDED.model,
    event_id = EXCLUDED.event_id,
    version = crm.lead_scores.version + 1,
    scored_at = now()
"""


class Lead(pydantic.BaseModel):
    """A lead event: a new or updated sales lead from a sign-up form or an import."""

    model_config = pydantic.ConfigDict(frozen=True)

    # Unique per event. A producer that sends the event again keeps it.
    event_id: str = pydantic.Field(min_length=1)
    lead_id: str = pydantic.Field(min_length=1)
    email: str = pydantic.Field(min_length=3)
    company: str | None = None
    employees: int | None = pydantic.Field(default=None, ge=0)
    source: str | None = None


class Score(pydantic.BaseModel):
    """The scoring service's response, as the step stores it."""

    model_config = pydantic.ConfigDict(frozen=True)

    score: float
    model: str


class ScoredLead(pydantic.BaseModel):
    """The value published to ``lead.scored``."""

    model_config = pydantic.ConfigDict(frozen=True)

    event_id: str
    lead_id: str
    score: float
    model: str


class LeadScorer(Handler[Lead]):
    topics = ("leads",)
    group_id = "lead-scorer"
    payload_model = Lead
    migrations = Path(__file__).parent / "migrations" / "scorer"
    scored_topic: ClassVar[str] = "lead.scored"

    def __init__(self) -> None:
        self.scoring_url = _scoring_url()

    def idempotency_key(self, message: Message[Lead]) -> str:
        return message.payload.event_id

    async def handle(self, message: Message[Lead], context: Context) -> None:
        lead = message.payload
        score = await self.score(lead, context)

        await context.connection.execute(
            UPSERT_SCORE, lead.lead_id, lead.email, lead.company, score.score, score.model, lead.event_id
        )

        scored = ScoredLead(event_id=lead.event_id, lead_id=lead.lead_id, score=score.score, model=score.model)
        await context.publish(self.scored_topic, scored, key=lead.lead_id)

    async def score(self, lead: Lead, context: Context) -> Score:
        """Return the lead's score: the stored response of step ``score``, or a new request's response."""
        headers = http.idempotency_headers(context, "score")
        stored = await context.step("score", self.request_score, lead, headers)
        return Score.model_validate(stored)

    async def request_score(self, lead: Lead, headers: dict[str, str]) -> dict[str, Any]:
        """POST the lead to the scoring service; return the response as JSON data for the step to store.

        A 400 or 422 status means the service will never accept this lead,
        so it raises `PermanentError` and the event is dead-lettered without
        retries. Other failures (timeouts, 5xx) raise httpx errors. Those are
        retried up to the worker's max attempts, then dead-lettered, and
        ``consumer dead-letters redrive`` applies them once the service is back.
        """
        # A client per request keeps the handler free of start and stop
        # hooks, which the framework does not have.
        async with httpx.AsyncClient(base_url=self.scoring_url, timeout=SCORING_TIMEOUT_S) as client:
            response = await client.post("/score", json=lead.model_dump(mode="json"), headers=headers)
        if response.status_code in (400, 422):
            raise PermanentError(
                f"the scoring service rejected lead {lead.lead_id} with {response.status_code}: {response.text[:200]}"
            )
        response.raise_for_status()
        score = Score.model_validate(response.json())
        return score.model_dump(mode="json")


def _scoring_url() -> str:
    url = os.environ.get(SCORER_URL_VAR, "")
    if not url:
        raise ConfigurationError(
            f"{SCORER_URL_VAR} is missing; set it to the scoring service's base URL, e.g. http://127.0.0.1:8787"
        )
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigurationError(f"{SCORER_URL_VAR}={url} is not an http or https URL")
    return url
