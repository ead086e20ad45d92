"""Keep each earthquake of the USGS feed at its newest version.

The feed is polled hourly, so the same version arrives again and again, and
now and then an older version comes after a newer one. Each version has its
own event id (``<usgs id>@<updated ms>``), used as the idempotency key, and
the upsert only moves a row forward, so a stale version never rolls it back.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer import Context, Handler, Message

UPSERT_QUAKE = """
INSERT INTO quake_store.quakes
    (quake_id, updated_at, occurred_at, magnitude, place, longitude, latitude, depth_km, event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (quake_id) DO UPDATE
SET updated_at = EXCLUDED.updated_at,
    occurred_at = EXCLUDED.occurred_at,
    magnitude = EXCLUDED.magnitude,
    place = EXCLUDED.place,
    longitude = EXCLUDED.longitude,
    latitude = EXCLUDED.latitude,
    depth_km = EXCLUDED.depth_km,
    event_id = EXCLUDED.event_id
WHERE quake_store.quakes.updated_at < EXCLUDED.updated_at
"""

RECORD_EVENT = "INSERT INTO quake_store.applied_events (event_id, quake_id) VALUES ($1, $2)"


class QuakeHandler(Handler[dict[str, Any]]):
    topics = ("quakes",)
    group_id = "quake-store"
    migrations = Path(__file__).parent / "migrations"
    # USGS now and then revises an event without bumping `updated`, so one
    # version id can carry two payloads. The row keeps the first one and the
    # next real version replaces it, so such a revision is logged, not
    # dead-lettered.
    on_key_conflict = "log"

    def fingerprint(self, message: Message[dict[str, Any]]) -> bytes:
        # The envelope's delivery id and poll metadata differ between polls
        # of the same version; only the feature itself must be equal.
        feature = json.dumps(message.payload["payload"], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(feature.encode()).digest()

    def idempotency_key(self, message: Message[dict[str, Any]]) -> str:
        return str(message.payload["event_id"])

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        event = message.payload
        feature = event["payload"]
        properties = feature.get("properties", {})
        coordinates = (feature.get("geometry") or {}).get("coordinates") or [None, None, None]
        quake_id = event["entity"]["id"]
        await context.connection.execute(
            UPSERT_QUAKE,
            quake_id,
            _timestamp(event["updated_at"]),
            _timestamp(event.get("occurred_at")),
            properties.get("mag"),
            properties.get("place"),
            coordinates[0],
            coordinates[1],
            coordinates[2] if len(coordinates) > 2 else None,
            event["event_id"],
        )
        await context.connection.execute(RECORD_EVENT, event["event_id"], quake_id)


def _timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
