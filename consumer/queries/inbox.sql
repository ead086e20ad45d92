-- Queries of the batch transaction. {schema} is the configured schema name.

-- name: lock_position
-- Lock the partition's fence row and read its position. A concurrent
-- transaction on the same partition waits here until the first one ends,
-- then reads the position that one committed.
SELECT next_offset, high_water, reprocess_until, epoch
FROM {schema}.positions
WHERE dedup_scope = $1 AND topic = $2 AND partition = $3
FOR UPDATE

-- name: create_position
-- First batch of a partition: create the row at the first fetched offset.
-- If another worker created it in the meantime, leave that row alone.
INSERT INTO {schema}.positions (dedup_scope, topic, partition, next_offset, high_water, group_id)
VALUES ($1, $2, $3, $4, $4, $5)
ON CONFLICT (dedup_scope, topic, partition) DO NOTHING

-- name: claim_keys
-- Claim idempotency keys; the ones returned are new. Keys are inserted in
-- sorted order so two transactions claiming overlapping keys lock them in
-- the same order and cannot deadlock on each other.
INSERT INTO {schema}.inbox (dedup_scope, idempotency_key, topic, partition, "offset", fingerprint)
SELECT $1, claim.idempotency_key, $2, $3, claim.message_offset, claim.fingerprint
FROM unnest($4::text[], $5::bigint[], $6::bytea[]) AS claim(idempotency_key, message_offset, fingerprint)
ORDER BY claim.idempotency_key
ON CONFLICT (dedup_scope, idempotency_key) DO NOTHING
RETURNING idempotency_key

-- name: release_keys
-- Give back claims of messages this transaction did not get to, so that
-- their redelivery is applied rather than skipped.
DELETE FROM {schema}.inbox
WHERE dedup_scope = $1 AND idempotency_key = ANY($2::text[])

-- name: mark_key_dead_lettered
UPDATE {schema}.inbox
SET status = 'dead_lettered'
WHERE dedup_scope = $1 AND idempotency_key = $2

-- name: advance_position
UPDATE {schema}.positions
SET next_offset = $4,
    high_water = greatest(high_water, $4),
    reprocess_until = CASE WHEN $4 >= reprocess_until THEN NULL ELSE reprocess_until END,
    group_id = $5,
    applied = applied + $6,
    position_duplicates = position_duplicates + $7,
    key_duplicates = key_duplicates + $8,
    dead_lettered = dead_lettered + $9,
    updated_at = now()
WHERE dedup_scope = $1 AND topic = $2 AND partition = $3

-- name: read_positions
-- Positions of the partitions a worker was just assigned.
SELECT topic, partition, next_offset, epoch
FROM {schema}.positions
WHERE dedup_scope = $1 AND topic = ANY($2::text[])

-- name: insert_dead_letter
INSERT INTO {schema}.dead_letters (
    dedup_scope, group_id, handler, topic, partition, "offset", timestamp_ms,
    idempotency_key, key, value, header_names, header_values, reason, attempts,
    first_error_type, first_error, last_error_type, last_error, traceback, status
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
ON CONFLICT (dedup_scope, topic, partition, "offset") DO UPDATE
SET status = EXCLUDED.status,
    reason = EXCLUDED.reason,
    attempts = EXCLUDED.attempts,
    last_error_type = EXCLUDED.last_error_type,
    last_error = EXCLUDED.last_error,
    traceback = EXCLUDED.traceback,
    updated_at = now()

-- name: stored_fingerprints
-- Payload fingerprints of keys that were claimed before, to tell a true
-- duplicate from a reused key with another payload.
SELECT idempotency_key, fingerprint
FROM {schema}.inbox
WHERE dedup_scope = $1 AND idempotency_key = ANY($2::text[])

-- name: parked_keys
-- Which of these Kafka keys are parked. FOR SHARE makes a concurrent
-- redrive of the same key wait until this transaction has parked its
-- messages, so no message is left parked without its key row.
SELECT key
FROM {schema}.parked_keys
WHERE dedup_scope = $1 AND topic = $2 AND key = ANY($3::bytea[])
FOR SHARE

-- name: park_key
INSERT INTO {schema}.parked_keys (dedup_scope, topic, key, first_offset, partition)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (dedup_scope, topic, key) DO NOTHING

-- name: set_dead_letter_status
UPDATE {schema}.dead_letters
SET status = $5, updated_at = now()
WHERE dedup_scope = $1 AND topic = $2 AND partition = $3 AND "offset" = $4

-- name: advance_idle_position
-- Move an idle partition's position over offsets that hold no record (a
-- transaction marker, a compacted gap), up to where the consumer fetches
-- next. The conditions make it a no-op if a batch or a replay moved the
-- row meanwhile.
UPDATE {schema}.positions
SET next_offset = $4,
    high_water = greatest(high_water, $4),
    updated_at = now()
WHERE dedup_scope = $1 AND topic = $2 AND partition = $3 AND next_offset = $5 AND epoch = $6
