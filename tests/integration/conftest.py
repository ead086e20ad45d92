"""Fixtures of the integration tests: a migrated database for the test handlers, and a reader of its rows."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.integration import helpers


@pytest.fixture
async def app_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """URL of a fresh database with the framework's and the test handlers' tables.

    The test handlers count their calls over CONSUMER_POSTGRES__DSN, so it is set to this URL.
    """
    await helpers.migrate(database_url)
    monkeypatch.setenv("CONSUMER_POSTGRES__DSN", database_url)
    monkeypatch.delenv(helpers.HOOKS_VAR, raising=False)
    yield database_url


@pytest.fixture
async def rows(app_database: str) -> AsyncIterator[helpers.Rows]:
    """A `helpers.Rows` reader on its own connection to `app_database`."""
    connection = await asyncpg.connect(app_database)
    try:
        yield helpers.Rows(connection)
    finally:
        await connection.close()
