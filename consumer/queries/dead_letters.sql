-- Queries of `consumer dead-letters`. {schema} is the configured schema name.
-- The list filters are fixed fragments with parameters, joined by the caller.

-- name: select_columns
SELECT id, dedup_scope, group_id, handler, topic, partition, "offset", timestamp_ms,
       idempotency_key, key, value, header_names, header_values, reason, attempts,
       first_error_type, first_error, last_error_type, last_error, traceback, status,
       redrive_attempts, created_at, updated_at, resolved_at
FROM {schema}.dead_letters

-- name: lock_dead_letter
-- Serialises concurrent redrives of one dead letter: the second one waits,
-- then finds it resolved and leaves it alone.
SELECT id, dedup_scope, group_id, handler, topic, partition, "offset", timestamp_ms,
       idempotency_key, key, value, header_names, header_values, status
FROM {schema}.dead_letters
WHERE id = $1
FOR UPDATE

-- name: lock_parked_key
SELECT first_offset
FROM {schema}.parked_keys
WHERE dedup_scope = $1 AND topic = $2 AND key = $3
FOR UPDATE

-- name: parked_letters_of_key
SELECT id, dedup_scope, group_id, handler, topic, partition, "offset", timestamp_ms,
       idempotency_key, key, value, header_names, header_values, status
FROM {schema}.dead_letters
WHERE dedup_scope = $1 AND topic = $2 AND key = $3 AND status = 'parked'
ORDER BY partition, "offset"
FOR UPDATE

-- name: unpark_key
DELETE FROM {schema}.parked_keys
WHERE dedup_scope = $1 AND topic = $2 AND key = $3

-- name: claim_for_redrive
-- Take the key for this redrive: insert it, or turn a claim left by the
-- dead-lettered attempt into an applied one. No row back means the key was
-- applied by another message since, so this one must not apply again.
INSERT INTO {schema}.inbox AS inbox (dedup_scope, idempotency_key, topic, partition, "offset", fingerprint)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedup_scope, idempotency_key) DO UPDATE
SET status = 'applied', claimed_at = now()
WHERE inbox.status = 'dead_lettered'
RETURNING idempotency_key

-- name: mark_resolved
UPDATE {schema}.dead_letters
SET status = 'resolved', resolved_at = now(), updated_at = now(), redrive_attempts = redrive_attempts + 1
WHERE id = $1

-- name: mark_redrive_failed
UPDATE {schema}.dead_letters
SET redrive_attempts = redrive_attempts + 1,
    last_error_type = $2,
    last_error = $3,
    traceback = $4,
    updated_at = now()
WHERE id = $1

-- name: delete_by_ids
DELETE FROM {schema}.dead_letters
WHERE id = ANY($1::bigint[])
RETURNING dedup_scope, topic, key, status

-- name: unpark_if_empty
-- After a purge, release a parked key that has no parked letter left.
DELETE FROM {schema}.parked_keys AS parked
WHERE parked.dedup_scope = $1 AND parked.topic = $2 AND parked.key = $3
  AND NOT EXISTS (
      SELECT 1 FROM {schema}.dead_letters AS letter
      WHERE letter.dedup_scope = parked.dedup_scope AND letter.topic = parked.topic
        AND letter.key = parked.key AND letter.status = 'parked'
  )
