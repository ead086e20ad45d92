"""Create and drop throwaway PostgreSQL databases for tests."""

from __future__ import annotations

import functools
import re
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from tests.support.waiting import run_blocking

__all__ = [
    "DATABASE_PREFIX",
    "LOCAL_ADMIN_DSN",
    "DatabaseFactory",
    "create_database",
    "database_exists",
    "database_name",
    "database_url",
    "drop_database",
    "is_reachable",
    "unique_database_name",
]

LOCAL_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_PREFIX = "consumer_test_"

# Lower-case SQL identifiers only, so a name never needs escaping inside quotes.
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_TERMINATE_BACKENDS = """
SELECT pg_terminate_backend(pid)
FROM pg_stat_activity
WHERE datname = $1 AND pid <> pg_backend_pid()
"""


def unique_database_name(prefix: str = DATABASE_PREFIX) -> str:
    """Return ``prefix`` followed by a random 64-bit hex suffix, so two tests are very unlikely to share a name."""
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def database_url(admin_dsn: str, name: str) -> str:
    """Return ``admin_dsn`` with its database replaced by ``name``, keeping host, user and query."""
    return urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    """Return the database that ``url`` connects to."""
    return urlsplit(url).path.lstrip("/")


async def is_reachable(dsn: str, *, timeout_s: float = 2.0) -> bool:
    """Return whether a connection to ``dsn`` opens and runs a query within ``timeout_s`` seconds."""
    try:
        connection = await asyncpg.connect(dsn, timeout=timeout_s)
    except (OSError, asyncpg.PostgresError):
        # TimeoutError is an OSError too.
        return False
    try:
        return bool(await connection.fetchval("SELECT 1", timeout=timeout_s) == 1)
    finally:
        await connection.close()


async def create_database(admin_dsn: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``admin_dsn`` and return its URL."""
    _check_name(name)
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return database_url(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str, *, timeout_s: float = 10.0) -> None:
    """Disconnect every session of database ``name``, then drop it. A missing database is no error."""
    _check_name(name)
    connection = await asyncpg.connect(admin_dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            await connection.execute(_TERMINATE_BACKENDS, name)
            try:
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            except asyncpg.ObjectInUseError:
                # A terminated backend can take a moment to exit, and a pool may reconnect meanwhile.
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(0.05)
            else:
                return
    finally:
        await connection.close()


async def database_exists(admin_dsn: str, name: str) -> bool:
    """Return whether database ``name`` exists on the server of ``admin_dsn``."""
    connection = await asyncpg.connect(admin_dsn)
    try:
        return bool(await connection.fetchval("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name))
    finally:
        await connection.close()


class DatabaseFactory:
    """Creates databases on one server and drops all of them in `drop_all`.

    Its methods block, so both sync tests and anyio tests can call them.
    """

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.created: list[str] = []

    def __call__(self, name: str | None = None) -> str:
        """Create database ``name`` (a fresh unique name by default) and return its URL."""
        name = name or unique_database_name()
        url = run_blocking(lambda: create_database(self.admin_dsn, name))
        self.created.append(name)
        return url

    def drop_all(self) -> None:
        """Drop every database this factory created, newest first."""
        while self.created:
            run_blocking(functools.partial(drop_database, self.admin_dsn, self.created.pop()))


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must be a lower-case SQL identifier of at most 63 characters")
