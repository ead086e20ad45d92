"""A consumer of ``lead.scored`` that records each scored lead once.

It is the service downstream of `examples.leads.handler.LeadScorer`. The
scorer's outbox relay sends every event at least once: a relay that dies
after the broker acknowledged a row but before marking it sent sends it
again. Each copy carries the same ``Idempotency-Key`` header, which is what
`Handler.idempotency_key` deduplicates on by default, so a second copy is a
no-op here.
"""

from __future__ import annotations

from pathlib import Path

from consumer import Context, Handler, Message
from examples.leads.handler import ScoredLead

__all__ = ["ScoredLeadCounter"]

RECORD_EVENT = "INSERT INTO crm.scored_events (event_key, lead_id, score) VALUES ($1, $2, $3)"


class ScoredLeadCounter(Handler[ScoredLead]):
    topics = ("lead.scored",)
    group_id = "lead-scored-counter"
    payload_model = ScoredLead
    migrations = Path(__file__).parent / "migrations" / "counter"

    async def handle(self, message: Message[ScoredLead], context: Context) -> None:
        event = message.payload
        await context.connection.execute(RECORD_EVENT, message.idempotency_key, event.lead_id, event.score)
