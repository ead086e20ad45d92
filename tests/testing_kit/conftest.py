"""The kit's pytest fixtures, on the suite's own broker and PostgreSQL.

The fixtures are imported here so that these tests run even when the
``consumer`` pytest11 entry point is not installed. When it is, these
definitions take precedence in this folder. ``consumer_broker`` and
``consumer_postgres`` are overridden to reuse the servers of
tests/conftest.py instead of starting a second pair.
"""

from __future__ import annotations

import pytest

from consumer.testing.plugin import (  # noqa: F401 - fixtures are found by name
    consumer_database,
    consumer_databases,
    consumer_harness,
    consumer_scenario,
)


@pytest.fixture(scope="session")
def consumer_broker(kafka_bootstrap: str) -> str:
    return kafka_bootstrap


@pytest.fixture(scope="session")
def consumer_postgres(pg_admin_dsn: str) -> str:
    return pg_admin_dsn
