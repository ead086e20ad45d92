"""Handlers the tracing tests run in-process: each message's JSON payload sets what the call does.

Payload fields:

- ``fail``: raise ValueError;
- ``publish_to``: publish ``{"id": ...}`` to that topic through the outbox;
- ``publish_traceparent``: publish with this ``traceparent`` header of the
  handler's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from consumer import BatchHandler, Context, Handler, Message


class ScriptedHandler(Handler[dict[str, Any]]):
    # The tests replace topics and group through the worker settings.
    topics: ClassVar[Sequence[str]] = ["tracing-unused"]
    group_id = "tracing-unused"

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        payload = message.payload
        if payload.get("fail"):
            raise ValueError(f"message {payload['id']} is marked to fail")
        topic = payload.get("publish_to")
        if topic:
            traceparent = payload.get("publish_traceparent")
            headers = [("traceparent", traceparent.encode())] if traceparent else None
            await context.publish(topic, {"id": payload["id"]}, key=str(payload["id"]), headers=headers)


class RecordingBatchHandler(BatchHandler[dict[str, Any]]):
    """Records the offsets of each call."""

    topics: ClassVar[Sequence[str]] = ["tracing-unused"]
    group_id = "tracing-unused"

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    async def handle_batch(self, messages: Sequence[Message[dict[str, Any]]], context: Context) -> None:
        self.calls.append([message.offset for message in messages])
