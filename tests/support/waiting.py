"""Poll a condition until it holds, and run coroutines from synchronous code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio

__all__ = ["run_blocking", "wait_for", "wait_for_sync"]

T = TypeVar("T")


async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.1,
    description: str | None = None,
) -> T:
    """Await ``predicate`` every ``interval_s`` seconds and return its first truthy result.

    Raises AssertionError naming ``description`` (or the predicate) and the
    last result when ``timeout_s`` seconds pass first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_message(predicate, description, timeout_s, result))
        await anyio.sleep(interval_s)


def wait_for_sync(
    predicate: Callable[[], T],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.1,
    description: str | None = None,
) -> T:
    """Call ``predicate`` every ``interval_s`` seconds and return its first truthy result.

    The blocking counterpart of `wait_for`, for tests that run no event loop.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_message(predicate, description, timeout_s, result))
        time.sleep(interval_s)


def run_blocking(make_coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in a helper thread and return its result.

    Sync fixtures use it, so it works even while the test's own loop exists.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-blocking") as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def _timeout_message(predicate: Callable[..., object], description: str | None, timeout_s: float, last: object) -> str:
    what = description or getattr(predicate, "__qualname__", repr(predicate))
    return f"timed out after {timeout_s} s waiting for {what}; last result: {last!r}"
