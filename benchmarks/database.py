"""The benchmark's throwaway database: creation, the framework's schema, the effect table and resets."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from consumer import migrations

__all__ = ["EFFECT_INSERT", "SCHEMA", "BenchDatabase"]

# Schema of the framework's tables in the benchmark database.
SCHEMA = "consumer"

# The effect every handler writes: one row per applied message. The primary
# key gives the insert the index maintenance a real effect table has.
_CREATE_EFFECTS = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE bench.effects (
    topic      text   NOT NULL,
    partition  integer NOT NULL,
    "offset"   bigint NOT NULL,
    event_id   text   NOT NULL,
    account    text   NOT NULL,
    amount     bigint NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
)
"""

EFFECT_INSERT = """
INSERT INTO bench.effects (topic, partition, "offset", event_id, account, amount)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING
"""

# Sends the partition's new position on channel bench_positions when a batch
# transaction moves it. PostgreSQL delivers a notification only when the
# transaction that sent it commits, so its arrival time is the commit time.
_CREATE_POSITION_TRIGGER = f"""
CREATE FUNCTION bench.notify_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_positions', NEW.partition || ' ' || NEW.next_offset);
    RETURN NEW;
END
$$;
CREATE TRIGGER bench_notify_position AFTER UPDATE ON {SCHEMA}.positions
FOR EACH ROW EXECUTE FUNCTION bench.notify_position();
ALTER TABLE {SCHEMA}.positions DISABLE TRIGGER bench_notify_position;
"""


class BenchDatabase:
    """A database named ``consumer_bench_<hex>`` on the server of `server_url`, dropped by `drop`."""

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        self.name = f"consumer_bench_{secrets.token_hex(4)}"
        self._admin_url = server_url
        self.url = urlunsplit((parts.scheme, parts.netloc, f"/{self.name}", parts.query, parts.fragment))

    async def create(self) -> None:
        """Create the database, apply the framework's migrations and add the effect table."""
        admin = await asyncpg.connect(self._admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()
        connection = await asyncpg.connect(self.url)
        try:
            await migrations.migrate(
                connection,
                SCHEMA,
                migrations.FRAMEWORK_NAMESPACE,
                migrations.discover(migrations.framework_migrations_dir()),
            )
            await connection.execute(_CREATE_EFFECTS)
            await connection.execute(_CREATE_POSITION_TRIGGER)
        finally:
            await connection.close()

    async def drop(self) -> None:
        admin = await asyncpg.connect(self._admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()

    async def reset(self) -> None:
        """Empty the effect and framework tables and flush dirty pages, so each run starts alike.

        The CHECKPOINT keeps a checkpoint triggered by the previous run's
        writes from landing inside the next run.
        """
        connection = await asyncpg.connect(self.url)
        try:
            await connection.execute(
                f"TRUNCATE bench.effects, {SCHEMA}.inbox, {SCHEMA}.positions, {SCHEMA}.dead_letters"
            )
            await connection.execute("VACUUM ANALYZE")
            await connection.execute("CHECKPOINT")
        finally:
            await connection.close()

    async def set_position_trigger(self, enabled: bool) -> None:
        """Turn the commit notification of position updates on (latency runs) or off."""
        action = "ENABLE" if enabled else "DISABLE"
        connection = await asyncpg.connect(self.url)
        try:
            await connection.execute(f"ALTER TABLE {SCHEMA}.positions {action} TRIGGER bench_notify_position")
        finally:
            await connection.close()

    async def count_effects(self) -> int:
        connection = await asyncpg.connect(self.url)
        try:
            count: int = await connection.fetchval("SELECT count(*) FROM bench.effects")
            return count
        finally:
            await connection.close()
