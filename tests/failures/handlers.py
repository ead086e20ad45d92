"""Handlers of the failure tests: faults chosen per message by headers, and one subclass per policy.

A message whose ``X-Fault`` header names an exception in `FAULTS` makes
`FaultyOrderHandler` raise it. With ``X-Fault-Times: n`` it is raised only
on the first n calls for the message's idempotency key. ``X-Sleep-S: s``
makes each call sleep s seconds before writing its effect. Setting
``CONSUMER_TEST_FAULTS_FIXED=1`` stands for a deployed fix: the handler then
ignores ``X-Fault`` and ``X-Sleep-S``, so a redrive with that variable set succeeds. Calls and
effects go to the ``test_app`` tables of `tests.support.handlers`, so the
tests count them the same way as for the shared test handlers.

Topics and the group id come from the worker settings, as for every test handler.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg

from consumer import Context, Message, RetryPolicy, errors
from tests.support import handlers
from tests.support.handlers import Order

FAULT_HEADER = "X-Fault"
FAULT_TIMES_HEADER = "X-Fault-Times"
SLEEP_HEADER = "X-Sleep-S"
FIXED_VAR = "CONSUMER_TEST_FAULTS_FIXED"

FAULTS: dict[str, Callable[[str], BaseException]] = {
    "ValueError": ValueError,
    "KeyError": KeyError,
    "RuntimeError": RuntimeError,
    "PermanentError": errors.PermanentError,
    # SQLSTATE 40001: the worker treats it as an infrastructure failure.
    "SerializationError": asyncpg.exceptions.SerializationError,
}


def is_fixed() -> bool:
    """Return whether the fix variable is set to 1."""
    return os.environ.get(FIXED_VAR) == "1"


async def raise_fault(message: Message[Any], previous_calls: int) -> None:
    """Raise the exception named by the message's ``X-Fault`` header, unless the fault is used up or fixed."""
    fault = message.header(FAULT_HEADER)
    if fault is None or is_fixed():
        return
    times = message.header(FAULT_TIMES_HEADER)
    if times is not None and previous_calls >= int(times):
        return
    name = fault.decode()
    raise FAULTS[name](f"injected {name} for {message.idempotency_key}")


async def sleep_if_requested(message: Message[Any]) -> None:
    """Sleep for the seconds in the message's ``X-Sleep-S`` header, unless the fault is fixed."""
    seconds = message.header(SLEEP_HEADER)
    if seconds is not None and not is_fixed():
        await anyio.sleep(float(seconds))


async def write_effect(message: Message[Any], context: Context) -> None:
    """Insert the message's effect row, with NULL order id and amount for a payload that is not an `Order`."""
    order = message.payload if isinstance(message.payload, Order) else None
    await context.connection.execute(
        handlers.INSERT_EFFECT,
        message.idempotency_key,
        order.order_id if order else None,
        order.amount if order else None,
        message.topic,
        message.partition,
        message.offset,
        handlers.worker_name(),
    )


class FaultyOrderHandler(handlers.OrderHandler):
    """Writes one effect per order and raises the fault its ``X-Fault`` header names.

    Gives up on `KeyError` at the first failure and retries other errors
    three times with short delays.
    """

    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1, give_up_on=(KeyError,))

    async def handle(self, message: Message[Order], context: Context) -> None:
        previous = await handlers.record_call(message.idempotency_key)
        await raise_fault(message, previous)
        await sleep_if_requested(message)
        await write_effect(message, context)


class BackoffOrderHandler(FaultyOrderHandler):
    """Five attempts with delays that double from 0.2 s and are capped at 0.4 s."""

    retry = RetryPolicy(max_attempts=5, initial_backoff_s=0.2, max_backoff_s=0.4)


class SlowRetryOrderHandler(FaultyOrderHandler):
    """Ten attempts 0.7 to 1.4 s apart: a poisoned message blocks its partition for 6.3 to 12.6 s."""

    retry = RetryPolicy(max_attempts=10, initial_backoff_s=1.4, max_backoff_s=1.4)


class TwoAttemptOrderHandler(FaultyOrderHandler):
    """Two attempts at most, to show which errors do not count as attempts."""

    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)


class ParkingOrderHandler(FaultyOrderHandler):
    """Parks a failed message's Kafka key instead of blocking the partition."""

    failure_mode = "park"


class LoggingConflictHandler(FaultyOrderHandler):
    """Logs a reused idempotency key and skips the message."""

    on_key_conflict = "log"


class DuplicateConflictHandler(FaultyOrderHandler):
    """Treats a reused idempotency key as a plain duplicate."""

    on_key_conflict = "duplicate"


class SkipTombstonesHandler(FaultyOrderHandler):
    """Skips null values although it declares a payload model."""

    tombstones = "skip"


class HandleTombstonesHandler(FaultyOrderHandler):
    """Hands null values to `handle` with payload None although it declares a payload model."""

    tombstones = "handle"


class RelaxedOrderHandler(FaultyOrderHandler):
    """Accepts any value as raw bytes: the fix for messages that failed decoding or validation."""

    # mypy takes OrderHandler's Order as the attribute's type; Handler allows None.
    payload_model = None  # type: ignore[assignment]
    payload_format = "bytes"
