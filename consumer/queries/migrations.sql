-- Bookkeeping of `consumer migrate`. {schema} is the configured schema name.

-- name: lock
-- Serialise concurrent runs (two pods starting together): the second waits
-- here, then finds every file applied and does nothing. A session lock,
-- because each file is applied in a transaction of its own.
SELECT pg_advisory_lock(hashtext('consumer.migrate:' || $1))

-- name: unlock
SELECT pg_advisory_unlock(hashtext('consumer.migrate:' || $1))

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: create_table
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    namespace   text        NOT NULL,
    version     integer     NOT NULL,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, version)
)

-- name: applied
SELECT version, name, checksum
FROM {schema}.schema_migrations
WHERE namespace = $1
ORDER BY version

-- name: record
INSERT INTO {schema}.schema_migrations (namespace, version, name, checksum)
VALUES ($1, $2, $3, $4)
