"""Fixtures of the failure tests: a migrated database for the test handlers and a reader of its rows."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.failures import handlers as failure_handlers
from tests.failures.helpers import FailureRows
from tests.integration import helpers


@pytest.fixture
async def app_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """URL of a fresh database with the framework's and the test handlers' tables.

    The test handlers count their calls over CONSUMER_POSTGRES__DSN, so it is
    set to this URL. The handlers start broken: the fix variable is unset.
    """
    await helpers.migrate(database_url)
    monkeypatch.setenv("CONSUMER_POSTGRES__DSN", database_url)
    monkeypatch.delenv(helpers.HOOKS_VAR, raising=False)
    monkeypatch.delenv(failure_handlers.FIXED_VAR, raising=False)
    yield database_url


@pytest.fixture
async def rows(app_database: str) -> AsyncIterator[FailureRows]:
    """A `FailureRows` reader on its own connection to `app_database`."""
    reader = await FailureRows.open(app_database)
    try:
        yield reader
    finally:
        await reader.close()
