"""Kafka consumers whose PostgreSQL effects happen exactly once.

Subclass `Handler`, write effects through ``context.connection``, and run it
with ``consumer run module:ClassName``. The guarantee and its limits are
described in `consumer.inbox`.

The names below are imported on first use, so that ``python -m consumer``
can install its SIGTERM handler before the heavy imports run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.errors import ConsumerError, PermanentError
    from consumer.handler import BatchHandler, Context, Handler
    from consumer.message import Message, RawMessage
    from consumer.retry import RetryPolicy
    from consumer.settings import Settings
    from consumer.worker import Worker

__all__ = [
    "BatchHandler",
    "ConsumerError",
    "Context",
    "Handler",
    "Message",
    "PermanentError",
    "RawMessage",
    "RetryPolicy",
    "Settings",
    "Worker",
]

__version__ = "0.1.0"

_HOMES = {
    "BatchHandler": "consumer.handler",
    "ConsumerError": "consumer.errors",
    "Context": "consumer.handler",
    "Handler": "consumer.handler",
    "Message": "consumer.message",
    "PermanentError": "consumer.errors",
    "RawMessage": "consumer.message",
    "RetryPolicy": "consumer.retry",
    "Settings": "consumer.settings",
    "Worker": "consumer.worker",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'consumer' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
