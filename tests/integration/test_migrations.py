"""`consumer.migrations` against a fresh database: the schema it creates, reruns, changed files and concurrent runs."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from consumer import errors, migrations
from tests.support import handlers

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SCHEMA = "consumer"
CREATE_TABLE = re.compile(r"CREATE TABLE \{schema\}\.(\w+)")


def framework_files() -> list[migrations.Migration]:
    return migrations.discover(migrations.framework_migrations_dir())


async def columns(connection: asyncpg.Connection, table: str) -> set[str]:
    rows = await connection.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
        SCHEMA,
        table,
    )
    return {row["column_name"] for row in rows}


async def key_columns(connection: asyncpg.Connection, table: str, constraint_type: str) -> list[list[str]]:
    """Return the column lists of the table's constraints of `constraint_type` ('p' primary, 'u' unique)."""
    rows = await connection.fetch(
        """
        SELECT array_agg(a.attname ORDER BY k.ordinality) AS names
        FROM pg_constraint c
        CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ordinality)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.conrelid = ($1 || '.' || $2)::regclass AND c.contype::text = $3
        GROUP BY c.oid
        """,
        SCHEMA,
        table,
        constraint_type,
    )
    return sorted(list(row["names"]) for row in rows)


@pytest.fixture
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def test_fresh_migrate_creates_documented_schema(connection: asyncpg.Connection) -> None:
    files = framework_files()

    applied = await migrations.migrate(connection, SCHEMA, migrations.FRAMEWORK_NAMESPACE, files)
    tables = {
        row["tablename"]
        for row in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", SCHEMA)
    }
    recorded = await connection.fetch(
        f"SELECT version, name, checksum FROM {SCHEMA}.schema_migrations WHERE namespace = $1 ORDER BY version",
        migrations.FRAMEWORK_NAMESPACE,
    )

    assert [migration.name for migration in applied] == [migration.name for migration in files]
    assert files[0].name == "0001_initial.sql"
    declared = {name for migration in files for name in CREATE_TABLE.findall(migration.text)}
    assert {"positions", "inbox", "dead_letters"} <= declared
    assert tables == declared | {"schema_migrations"}
    assert [(row["version"], row["name"], row["checksum"]) for row in recorded] == [
        (migration.version, migration.name, migration.checksum) for migration in files
    ]
    assert {
        "dedup_scope",
        "topic",
        "partition",
        "next_offset",
        "applied",
        "key_duplicates",
        "position_duplicates",
        "dead_lettered",
    } <= await columns(connection, "positions")
    assert {"dedup_scope", "idempotency_key", "topic", "partition", "offset", "fingerprint", "status"} <= await columns(
        connection, "inbox"
    )
    assert {
        "topic",
        "partition",
        "offset",
        "key",
        "value",
        "header_names",
        "header_values",
        "reason",
        "attempts",
        "first_error_type",
        "last_error_type",
        "status",
        "created_at",
    } <= await columns(connection, "dead_letters")
    assert await key_columns(connection, "positions", "p") == [["dedup_scope", "topic", "partition"]]
    assert await key_columns(connection, "inbox", "p") == [["dedup_scope", "idempotency_key"]]
    assert ["dedup_scope", "topic", "partition", "offset"] in await key_columns(connection, "dead_letters", "u")


async def test_second_migrate_applies_nothing(connection: asyncpg.Connection) -> None:
    handler_files = migrations.discover(handlers.MIGRATIONS)
    namespace = handlers.OrderHandler.group_id
    await migrations.migrate(connection, SCHEMA, migrations.FRAMEWORK_NAMESPACE, framework_files())
    await migrations.migrate(connection, SCHEMA, namespace, handler_files)
    before = await connection.fetch(f"SELECT * FROM {SCHEMA}.schema_migrations ORDER BY namespace, version")

    again = await migrations.migrate(connection, SCHEMA, migrations.FRAMEWORK_NAMESPACE, framework_files())
    again_handler = await migrations.migrate(connection, SCHEMA, namespace, handler_files)
    after = await connection.fetch(f"SELECT * FROM {SCHEMA}.schema_migrations ORDER BY namespace, version")

    assert again == []
    assert again_handler == []
    assert after == before
    assert {row["namespace"] for row in after} == {migrations.FRAMEWORK_NAMESPACE, namespace}


async def test_changed_applied_file_rejected(connection: asyncpg.Connection, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(migrations.framework_migrations_dir(), folder)  # type: ignore[arg-type]
    await migrations.migrate(connection, SCHEMA, migrations.FRAMEWORK_NAMESPACE, migrations.discover(folder))
    first = folder / "0001_initial.sql"
    first.write_text(first.read_text() + "\nCREATE TABLE {schema}.sneaked_in (id int);\n")

    with pytest.raises(errors.MigrationError, match=r"0001_initial\.sql") as raised:
        await migrations.migrate(connection, SCHEMA, migrations.FRAMEWORK_NAMESPACE, migrations.discover(folder))
    sneaked = await connection.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.sneaked_in")

    assert "changed after it was applied" in str(raised.value)
    assert sneaked is None


async def test_failed_file_applies_nothing_of_itself(connection: asyncpg.Connection, tmp_path: Path) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE {schema}.good (id int);\n")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE {schema}.half (id int);\nSELECT no_such_function();\n")

    with pytest.raises(errors.MigrationError, match=r"0002_broken\.sql") as raised:
        await migrations.migrate(connection, SCHEMA, "failing", migrations.discover(tmp_path))
    recorded = await connection.fetch(f"SELECT name FROM {SCHEMA}.schema_migrations WHERE namespace = 'failing'")

    assert "nothing of it was applied" in str(raised.value)
    assert [row["name"] for row in recorded] == ["0001_good.sql"]
    assert await connection.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.good") is not None
    assert await connection.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.half") is None
    # The session lock was given back, so a fixed file can be applied at once.
    assert await connection.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


async def test_concurrent_migrate_applies_once(database_url: str) -> None:
    files = framework_files()
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        results = await asyncio.gather(
            migrations.migrate(first, SCHEMA, migrations.FRAMEWORK_NAMESPACE, files),
            migrations.migrate(second, SCHEMA, migrations.FRAMEWORK_NAMESPACE, files),
        )
        recorded = await first.fetch(f"SELECT version FROM {SCHEMA}.schema_migrations ORDER BY version")
    finally:
        await first.close()
        await second.close()

    assert sorted(len(result) for result in results) == [0, len(files)]
    assert [row["version"] for row in recorded] == [migration.version for migration in files]
