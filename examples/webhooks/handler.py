"""Keep a ledger of GitHub webhook deliveries, and the latest event of each object they are about.

GitHub sends a webhook at least once: a failed or timed-out delivery is
redelivered with the same ``X-GitHub-Delivery`` GUID, and a producer that
forwards webhooks into Kafka may send one twice. The GUID is the idempotency
key, so each delivery is recorded once however often it arrives. Deliveries
about one object (an issue, a pull request) can arrive out of order, so the
object's row only moves forward in ``occurred_at``.

The records are envelopes around the original JSON body; see
data/ATTRIBUTION.md for their fields.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pydantic

from consumer import Context, Handler, Message

__all__ = ["Entity", "GitHubDelivery", "WebhookLedger"]

RECORD_DELIVERY = """
INSERT INTO webhook_ledger.deliveries
    (event_id, event_name, action, entity_kind, entity_id, occurred_at, repository, sender)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

# `deliveries` counts every applied delivery; the last_* columns change only
# for a delivery newer than the stored one (the same condition three times).
# A null time is older than any time.
UPSERT_ENTITY = """
INSERT INTO webhook_ledger.entities AS stored
    (kind, entity_id, deliveries, last_event_type, last_event_id, last_occurred_at)
VALUES ($1, $2, 1, $3, $4, $5)
ON CONFLICT (kind, entity_id) DO UPDATE
SET deliveries = stored.deliveries + 1,
    last_event_type = CASE
        WHEN EXCLUDED.last_occurred_at > stored.last_occurred_at
          OR (stored.last_occurred_at IS NULL AND EXCLUDED.last_occurred_at IS NOT NULL)
        THEN EXCLUDED.last_event_type ELSE stored.last_event_type END,
    last_event_id = CASE
        WHEN EXCLUDED.last_occurred_at > stored.last_occurred_at
          OR (stored.last_occurred_at IS NULL AND EXCLUDED.last_occurred_at IS NOT NULL)
        THEN EXCLUDED.last_event_id ELSE stored.last_event_id END,
    last_occurred_at = CASE
        WHEN EXCLUDED.last_occurred_at > stored.last_occurred_at
          OR (stored.last_occurred_at IS NULL AND EXCLUDED.last_occurred_at IS NOT NULL)
        THEN EXCLUDED.last_occurred_at ELSE stored.last_occurred_at END
"""


class Entity(pydantic.BaseModel):
    """The GitHub object a delivery is about, such as an issue or a pull request."""

    kind: str
    id: int


class GitHubDelivery(pydantic.BaseModel):
    """One webhook delivery: the request's headers and body, with fields derived from them."""

    # The X-GitHub-Delivery GUID, the same on every redelivery.
    event_id: str = pydantic.Field(min_length=1)
    # ``<X-GitHub-Event>.<payload.action>``, or the event name alone.
    event_type: str
    occurred_at: datetime | None = None
    entity: Entity | None = None
    headers: dict[str, str]
    payload: dict[str, Any]

    @property
    def event_name(self) -> str:
        return self.headers.get("X-GitHub-Event") or self.event_type.split(".", 1)[0]


class WebhookLedger(Handler[GitHubDelivery]):
    topics = ("github-webhooks",)
    group_id = "webhook-ledger"
    payload_model = GitHubDelivery
    migrations = Path(__file__).parent / "migrations"

    def idempotency_key(self, message: Message[GitHubDelivery]) -> str:
        return message.payload.event_id

    async def handle(self, message: Message[GitHubDelivery], context: Context) -> None:
        delivery = message.payload
        body = delivery.payload
        entity = delivery.entity
        await context.connection.execute(
            RECORD_DELIVERY,
            delivery.event_id,
            delivery.event_name,
            body.get("action") if isinstance(body.get("action"), str) else None,
            entity.kind if entity else None,
            entity.id if entity else None,
            delivery.occurred_at,
            _field(body, "repository", "full_name"),
            _field(body, "sender", "login"),
        )
        if entity is not None:
            await context.connection.execute(
                UPSERT_ENTITY, entity.kind, entity.id, delivery.event_type, delivery.event_id, delivery.occurred_at
            )


def _field(body: dict[str, Any], section: str, name: str) -> str | None:
    """Return ``body[section][name]`` when both exist and the value is text."""
    value = body.get(section)
    if not isinstance(value, dict):
        return None
    text = value.get(name)
    return text if isinstance(text, str) else None
