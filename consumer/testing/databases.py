"""Throwaway PostgreSQL databases with the framework's schema, and the migrations of handlers.

`DatabaseFactory` migrates one template database with the framework's
migrations, then creates each test database as a copy of it (``CREATE
DATABASE ... TEMPLATE``), which takes milliseconds instead of a full
migration run. A handler's own ``migrations`` folder is applied to each copy
by `migrate`, recorded under the handler's group id as ``consumer migrate
--handler`` records it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import re
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from consumer import migrations
from consumer.handler import Handler

__all__ = ["DatabaseFactory", "database_url", "migrate", "run_sync"]

T = TypeVar("T")

DATABASE_PREFIX = "consumer_testing_"
# Lower-case identifiers only, so a database name never needs escaping in quotes.
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_DROP_TIMEOUT_S = 10.0

_TERMINATE_BACKENDS = """
SELECT pg_terminate_backend(pid)
FROM pg_stat_activity
WHERE datname = $1 AND pid <> pg_backend_pid()
"""


def run_sync(make_coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in a helper thread and return its result.

    Fixtures are synchronous, so they work with any async test plugin; this
    lets them use asyncpg even while a test's own event loop runs.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="consumer-testing") as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def database_url(admin_dsn: str, name: str) -> str:
    """Return `admin_dsn` with its database replaced by `name`, keeping host, user and query."""
    return urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))


async def migrate(
    dsn: str,
    handlers: Iterable[Handler[Any] | type[Handler[Any]]] = (),
    *,
    schema: str = "consumer",
    framework: bool = True,
) -> None:
    """Apply the framework's migrations (unless `framework` is False), then each handler's own folder.

    A handler without a ``migrations`` folder is skipped. Already applied
    files are left alone, as ``consumer migrate`` does.
    """
    connection = await asyncpg.connect(dsn)
    try:
        if framework:
            files = migrations.discover(migrations.framework_migrations_dir())
            await migrations.migrate(connection, schema, migrations.FRAMEWORK_NAMESPACE, files)
        for handler in handlers:
            handler_class = handler if isinstance(handler, type) else type(handler)
            if handler_class.migrations is None:
                continue
            files = migrations.discover(handler_class.migrations)
            await migrations.migrate(connection, schema, handler_class.group_id, files)
    finally:
        await connection.close()


class DatabaseFactory:
    """Creates databases with the framework's schema on one server, and drops them all in `drop_all`.

    `admin_dsn` must belong to a user allowed to create databases. Its
    methods block, so synchronous fixtures and async tests can both call them.
    """

    def __init__(self, admin_dsn: str, *, schema: str = "consumer") -> None:
        self.admin_dsn = admin_dsn
        self.schema = schema
        self._template: str | None = None
        self._created: list[str] = []

    def create(self, handlers: Iterable[Handler[Any] | type[Handler[Any]]] = ()) -> str:
        """Create a database with the framework's schema and the handlers' tables; return its URL."""
        handlers = list(handlers)
        return run_sync(lambda: self._create(handlers))

    def drop(self, url: str) -> None:
        """Drop the database at `url`, which this factory created, after disconnecting its sessions."""
        name = urlsplit(url).path.lstrip("/")
        if name not in self._created:
            raise ValueError(f"database {name!r} was not created by this factory; drop only its own databases")
        self._created.remove(name)
        run_sync(lambda: _drop_database(self.admin_dsn, name))

    def drop_all(self) -> None:
        """Drop every database this factory created, its template last."""
        for name in reversed(self._created):
            run_sync(functools.partial(_drop_database, self.admin_dsn, name))
        self._created.clear()
        if self._template is not None:
            template, self._template = self._template, None
            run_sync(lambda: _drop_database(self.admin_dsn, template))

    async def _create(self, handlers: list[Handler[Any] | type[Handler[Any]]]) -> str:
        if self._template is None:
            template = _unique_name("template_")
            await _create_database(self.admin_dsn, template)
            self._template = template
            await migrate(database_url(self.admin_dsn, template), schema=self.schema)
        name = _unique_name()
        await _create_database(self.admin_dsn, name, template=self._template)
        self._created.append(name)
        url = database_url(self.admin_dsn, name)
        if handlers:
            await migrate(url, handlers, schema=self.schema, framework=False)
        return url


def _unique_name(infix: str = "") -> str:
    return f"{DATABASE_PREFIX}{infix}{uuid.uuid4().hex[:16]}"


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must be a lower-case SQL identifier of at most 63 characters")


async def _create_database(admin_dsn: str, name: str, *, template: str | None = None) -> None:
    _check_name(name)
    statement = f'CREATE DATABASE "{name}"'
    if template is not None:
        _check_name(template)
        statement += f' TEMPLATE "{template}"'
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    """Disconnect every session of database `name`, then drop it; a missing database is no error."""
    _check_name(name)
    connection = await asyncpg.connect(admin_dsn)
    try:
        deadline = time.monotonic() + _DROP_TIMEOUT_S
        while True:
            await connection.execute(_TERMINATE_BACKENDS, name)
            try:
                await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            except asyncpg.ObjectInUseError:
                # A terminated backend takes a moment to exit, and a pool may reconnect meanwhile.
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(0.05)
            else:
                return
    finally:
        await connection.close()
