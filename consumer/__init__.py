"""Kafka consumers whose PostgreSQL effects happen exactly once.

Subclass `Handler`, write effects through ``context.connection``, and run it
with ``consumer run module:ClassName``. The guarantee and its limits are
described in `consumer.inbox`.
"""

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
