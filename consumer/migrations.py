"""`consumer migrate`: apply numbered ``.sql`` files in order, once each.

Files are named ``NNNN_description.sql``. Each is applied in its own
transaction and recorded with its SHA-256 in ``<schema>.schema_migrations``
under a namespace: ``consumer`` for the framework's files, the handler's
group id for a handler's own `migrations` folder. Running again when
everything is applied does nothing. An applied file whose content changed
stops the run, because the database no longer matches what the file says.
Concurrent runs are serialised by an advisory lock.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

from consumer import db, errors

__all__ = ["FRAMEWORK_NAMESPACE", "Migration", "discover", "framework_migrations_dir", "migrate"]

logger = logging.getLogger(__name__)

FRAMEWORK_NAMESPACE = "consumer"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def framework_migrations_dir() -> Traversable:
    """Return the framework's migration folder: inside the wheel, else the repository's ``sql/``."""
    packaged = resources.files("consumer").joinpath("_migrations")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def discover(folder: Traversable) -> list[Migration]:
    """Read the migration files of `folder`, in version order."""
    if not folder.is_dir():
        raise errors.MigrationError(f"migration folder {folder} does not exist")
    migrations: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise errors.MigrationError(
                f"migration file {entry.name!r} is not named NNNN_description.sql; rename it, e.g. 0002_add_index.sql"
            )
        migrations.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    migrations.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in migrations]
    if len(set(versions)) != len(versions):
        raise errors.MigrationError(f"two migration files in {folder} share a version number: {versions}")
    return migrations


async def migrate(
    connection: asyncpg.Connection,
    schema: str,
    namespace: str,
    migrations: list[Migration],
) -> list[Migration]:
    """Apply the files of `migrations` not yet recorded under `namespace`; return those applied."""
    queries = db.load_queries("migrations.sql", schema)
    await connection.execute(queries.lock, schema)
    try:
        await connection.execute(queries.create_schema)
        await connection.execute(queries.create_table)
        applied = {row["version"]: row for row in await connection.fetch(queries.applied, namespace)}
        _check_unchanged(namespace, migrations, applied)
        done: list[Migration] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            await _apply(connection, queries, schema, namespace, migration)
            done.append(migration)
    finally:
        await connection.execute(queries.unlock, schema)
    if not done:
        logger.info("schema up to date", extra={"action": "migrations_up_to_date", "namespace": namespace})
    return done


def _check_unchanged(namespace: str, migrations: list[Migration], applied: dict[int, asyncpg.Record]) -> None:
    by_version = {migration.version: migration for migration in migrations}
    for version, row in applied.items():
        migration = by_version.get(version)
        if migration is None:
            continue
        if migration.checksum != row["checksum"]:
            raise errors.MigrationError(
                f"migration {migration.name} ({namespace}) was changed after it was applied "
                f"(recorded checksum {row['checksum'][:12]}, file now {migration.checksum[:12]}); "
                "restore the file and put the change in a new numbered file"
            )


async def _apply(
    connection: asyncpg.Connection,
    queries: db.Queries,
    schema: str,
    namespace: str,
    migration: Migration,
) -> None:
    async with connection.transaction():
        try:
            await connection.execute(migration.text.replace("{schema}", schema))
        except asyncpg.PostgresError as exc:
            raise errors.MigrationError(
                f"migration {migration.name} ({namespace}) failed: {type(exc).__name__}: {exc}; "
                "nothing of it was applied"
            ) from exc
        await connection.execute(queries.record, namespace, migration.version, migration.name, migration.checksum)
    logger.info(
        "applied migration %s",
        migration.name,
        extra={"action": "migration_applied", "namespace": namespace, "version": migration.version},
    )
