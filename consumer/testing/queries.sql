-- Read-only queries the testing kit asserts with. {schema} is the framework's schema name.

-- name: dedup_records
-- Dedup records of one key; the primary key allows at most one.
SELECT idempotency_key, topic, partition, "offset", status
FROM {schema}.inbox
WHERE dedup_scope = $1 AND idempotency_key = $2

-- name: positions
SELECT topic, partition, next_offset, high_water, epoch
FROM {schema}.positions
WHERE dedup_scope = $1
ORDER BY topic, partition

-- name: dead_letters
SELECT id, topic, partition, "offset", idempotency_key, key, value, reason, attempts,
       last_error_type, last_error, status
FROM {schema}.dead_letters
WHERE dedup_scope = $1
ORDER BY topic, partition, "offset"

-- name: outbox
SELECT id, topic, key, value, header_names, header_values, sent_at
FROM {schema}.outbox
WHERE dedup_scope = $1
ORDER BY id

-- name: step_results
SELECT idempotency_key, step_name, call_number, result::text AS result
FROM {schema}.step_results
WHERE dedup_scope = $1
ORDER BY idempotency_key, step_name, call_number

-- name: lock_waiters
-- How many of the given backends wait for a lock, to tell when racing
-- transactions are all queued behind the fence row.
SELECT count(*)
FROM pg_stat_activity
WHERE pid = ANY($1::integer[]) AND wait_event_type = 'Lock'
