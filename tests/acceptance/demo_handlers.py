"""A corrected quake handler, standing in for a fix deployed after the demo's broken events failed."""

from __future__ import annotations

from typing import Any

from consumer import Context, Message
from examples.quakes.handler import QuakeHandler


class LenientQuakeHandler(QuakeHandler):
    """Takes the quake id from the event page URL when the envelope lost its `entity` field."""

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        event = message.payload
        if "entity" not in event:
            url = event["payload"]["properties"]["url"]
            event["entity"] = {"kind": "earthquake", "id": url.rstrip("/").rsplit("/", 1)[-1]}
        await super().handle(message, context)
