"""PostgreSQL access: the connection pool and the named queries.

Runtime SQL lives in ``consumer/queries/*.sql``. Each query starts with a
``-- name: NAME`` line and runs until the next one. ``{schema}`` in the text
is replaced by the configured schema name, which the settings validate as a
plain identifier, so no user input is ever spliced into SQL.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import asyncpg

from consumer import errors
from consumer.settings import PostgresSettings, mask_dsn

__all__ = ["Queries", "connect", "create_pool", "load_queries"]

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


class Queries:
    """Named queries of one ``.sql`` file, with the schema name filled in."""

    def __init__(self, texts: dict[str, str]) -> None:
        self._texts = texts

    def __getattr__(self, name: str) -> str:
        try:
            return self._texts[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r}") from None

    def names(self) -> list[str]:
        return list(self._texts)


@functools.cache
def _read(file_name: str) -> str:
    return resources.files("consumer.queries").joinpath(file_name).read_text(encoding="utf-8")


@functools.cache
def load_queries(file_name: str, schema: str) -> Queries:
    """Parse ``consumer/queries/FILE_NAME`` into named queries for `schema`."""
    text = _read(file_name)
    parts = _NAME_LINE.split(text)
    texts: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        texts[name] = body.strip().replace("{schema}", schema)
    return Queries(texts)


def _connect_kwargs(settings: PostgresSettings) -> dict[str, Any]:
    if settings.dsn is None:
        raise errors.ConfigurationError(
            "CONSUMER_POSTGRES__DSN is missing; set it to postgresql://user:password@host:5432/database"
        )
    return {
        "dsn": settings.dsn.get_secret_value(),
        "timeout": settings.connect_timeout_s,
        "statement_cache_size": settings.statement_cache_size,
        "server_settings": {"application_name": settings.application_name},
    }


async def connect(settings: PostgresSettings) -> asyncpg.Connection:
    """Open one connection, for CLI commands; errors name the host but never the password."""
    kwargs = _connect_kwargs(settings)
    try:
        connection: asyncpg.Connection = await asyncpg.connect(**kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise _connection_error(settings, exc) from None
    return connection


async def create_pool(settings: PostgresSettings, *, side: bool = False) -> asyncpg.Pool:
    """Open the worker's pool; at least one connection is made so a bad DSN fails at start-up.

    With `side`, open the small pool for work outside batch transactions
    (step results, the outbox relay): at most 4 connections, none kept while
    idle, named ``<application_name>:side`` in pg_stat_activity.
    """
    kwargs = _connect_kwargs(settings)
    sizes: dict[str, float] = {"min_size": max(settings.pool_min_size, 1), "max_size": settings.pool_max_size}
    if side:
        sizes = {"min_size": 0, "max_size": 4, "max_inactive_connection_lifetime": 30.0}
        kwargs["server_settings"] = {"application_name": f"{settings.application_name}:side"}
    try:
        pool = await asyncpg.create_pool(**sizes, reset=_keep_session, **kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise _connection_error(settings, exc) from None
    assert pool is not None
    return pool


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release, one round trip per batch.

    The framework never leaves session state behind: a batch ends in COMMIT
    or ROLLBACK, and a connection whose transaction ended any other way is
    terminated instead of released. Handlers must not LISTEN or change
    session settings on the connection they are handed.
    """


def _connection_error(settings: PostgresSettings, exc: BaseException) -> errors.InfrastructureError:
    assert settings.dsn is not None
    target = mask_dsn(settings.dsn.get_secret_value())
    detail = str(exc).replace(settings.dsn.get_secret_value(), target)
    return errors.InfrastructureError(
        f"cannot connect to PostgreSQL at {target}: {type(exc).__name__}: {detail}; "
        "check CONSUMER_POSTGRES__DSN and that the server is reachable"
    )
