-- Initial schema: positions, dedup records and dead letters.
-- {schema} is replaced by the configured schema name (a validated identifier).

CREATE SCHEMA IF NOT EXISTS {schema};

-- One row per (dedup scope, topic, partition). It is the partition's fence:
-- every batch transaction locks it first, so two workers that both believe
-- they own the partition are serialised, and the second one sees the first
-- one's advanced position and skips what was already applied.
CREATE TABLE {schema}.positions (
    dedup_scope        text        NOT NULL,
    topic              text        NOT NULL,
    partition          integer     NOT NULL,
    -- Offset of the next message to apply; every lower offset is done
    -- (applied, skipped as a duplicate, or dead-lettered). A replay moves it.
    next_offset        bigint      NOT NULL,
    -- Highest next_offset ever stored. It never moves back (except over an
    -- explicit reprocess range), so offsets below it stay duplicates after
    -- a replay, whatever happened to their dedup records.
    high_water         bigint      NOT NULL,
    -- While set, offsets from next_offset up to this one are applied again
    -- even though they are below high_water: a reprocess on purpose.
    reprocess_until    bigint,
    -- Incremented by every replay. A worker whose batch was fetched under
    -- another epoch discards it and seeks to the new position.
    epoch              bigint      NOT NULL DEFAULT 0,
    -- Group id of the worker that last advanced the position.
    group_id           text        NOT NULL,
    -- Running totals, updated in the same transaction as next_offset, so
    -- they survive crashes and never count a rolled-back batch.
    applied            bigint      NOT NULL DEFAULT 0,
    position_duplicates bigint     NOT NULL DEFAULT 0,
    key_duplicates     bigint      NOT NULL DEFAULT 0,
    dead_lettered      bigint      NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dedup_scope, topic, partition)
);

-- Dedup records: one row per idempotency key that was claimed. The primary
-- key is the uniqueness guard: a second transaction inserting the same key
-- waits for the first one, then skips the message if it committed or takes
-- over the claim if it rolled back.
CREATE TABLE {schema}.inbox (
    dedup_scope   text        NOT NULL,
    idempotency_key text      NOT NULL,
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    "offset"      bigint      NOT NULL,
    -- SHA-256 of the message value, to tell a true duplicate from a reused key.
    fingerprint   bytea       NOT NULL,
    -- 'applied' or 'dead_lettered'.
    status        text        NOT NULL DEFAULT 'applied',
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dedup_scope, idempotency_key)
);

-- Pruning walks each scope's oldest claims first.
CREATE INDEX inbox_claimed_at ON {schema}.inbox (dedup_scope, claimed_at);
-- Reprocessing a range looks claims up by position.
CREATE INDEX inbox_position ON {schema}.inbox (dedup_scope, topic, partition, "offset");

-- Messages that could not be applied, with their raw bytes, so they can be
-- inspected and redriven. Written in the transaction that moves the
-- position past them, so a message is never both skipped and missing here.
CREATE TABLE {schema}.dead_letters (
    id              bigserial   PRIMARY KEY,
    dedup_scope     text        NOT NULL,
    group_id        text        NOT NULL,
    handler         text        NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    -- Broker timestamp of the message, in milliseconds since the epoch.
    timestamp_ms    bigint,
    idempotency_key text,
    key             bytea,
    value           bytea,
    -- Header names and values in their original order; repeated names and
    -- null values are kept as they came.
    header_names    text[]      NOT NULL DEFAULT '{}',
    header_values   bytea[]     NOT NULL DEFAULT '{}',
    -- Why it was dead-lettered: 'handler_error', 'permanent', 'decode',
    -- 'validation', 'timeout', 'tombstone', 'conflict' (the key was applied
    -- before with another payload) or 'parked_behind' (an earlier message
    -- with the same Kafka key is parked).
    reason          text        NOT NULL,
    attempts        integer     NOT NULL,
    first_error_type text       NOT NULL,
    first_error     text        NOT NULL,
    last_error_type text        NOT NULL,
    last_error      text        NOT NULL,
    traceback       text        NOT NULL DEFAULT '',
    -- 'dead', or 'parked' while its Kafka key is parked, until a redrive
    -- applies it ('resolved').
    status          text        NOT NULL DEFAULT 'dead',
    redrive_attempts integer    NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    UNIQUE (dedup_scope, topic, partition, "offset")
);

CREATE INDEX dead_letters_status ON {schema}.dead_letters (status, created_at);
CREATE INDEX dead_letters_key ON {schema}.dead_letters (dedup_scope, topic, key) WHERE status = 'parked';

-- Kafka keys whose messages wait behind a failed one, for handlers that park
-- by key instead of blocking the partition. While a row exists, every new
-- message with that key is stored as a 'parked' dead letter in offset
-- order; a redrive applies them in that order and then deletes the row.
CREATE TABLE {schema}.parked_keys (
    dedup_scope   text        NOT NULL,
    topic         text        NOT NULL,
    key           bytea       NOT NULL,
    first_offset  bigint      NOT NULL,
    partition     integer     NOT NULL,
    parked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dedup_scope, topic, key)
);
