"""Races found by the chaos runs, each pinned by a test named after it."""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import anyio
import asyncpg
import pytest

from consumer import retry

pytestmark = [pytest.mark.chaos, pytest.mark.anyio]

ROUNDS = 20


@pytest.mark.timeout(60)
async def test_backend_terminated_between_statements_is_infrastructure(database_url: str) -> None:
    """A batch connection whose backend is killed between two statements must be retried, not end the worker.

    What asyncpg 0.32 raises on the next statement depends on how far it has
    read the server's FATAL message and the closed socket:

    - nothing read yet: ConnectionDoesNotExistError;
    - the message read, the end of the stream not yet: InternalClientError
      "cannot switch to state 12; another operation (2) is in progress";
    - both read: InterfaceError "connection has been released back to the pool".

    The chaos run met the second one in `inbox._claim` after a ``pg_terminate_backend``.
    """
    # The default sslmode=prefer opens each connection with a TLS probe whose
    # future asyncpg leaves unretrieved when the socket closes during it; the
    # event loop then reports that error after the test. The probe is not what
    # this test is about, so connect without it.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, ssl=False)
    admin = await asyncpg.connect(database_url, ssl=False)
    raised: Counter[str] = Counter()
    not_infrastructure: list[str] = []
    try:
        for _ in range(ROUNDS):
            connection = await pool.acquire()
            try:
                await connection.execute("BEGIN")
                pid = await connection.fetchval("SELECT pg_backend_pid()")
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                # A blocking sleep keeps the event loop from reading the socket
                # while the FATAL message and the end of the stream arrive. Two
                # turns of the loop then read the message but, most of the time,
                # not the end of the stream: the state the chaos run hit.
                time.sleep(0.05)
                await anyio.sleep(0)
                await anyio.sleep(0)
                with pytest.raises(Exception) as caught:  # noqa: PT011 - any error is possible; its class is checked
                    await connection.fetch("SELECT 1")
                raised[type(caught.value).__name__] += 1
                if not retry.is_infrastructure(caught.value):
                    not_infrastructure.append(f"{type(caught.value).__name__}: {caught.value}")
            finally:
                with contextlib.suppress(asyncpg.InterfaceError):
                    connection.terminate()
                await pool.release(connection)
    finally:
        await admin.close()
        await pool.close()

    print(f"errors raised on the next statement: {dict(raised)}")
    assert not_infrastructure == [], dict(raised)
