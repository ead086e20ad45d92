-- Queries of stored steps and the outbox. {schema} is the configured schema name.

-- name: read_step
SELECT result
FROM {schema}.step_results
WHERE dedup_scope = $1 AND idempotency_key = $2 AND step_name = $3 AND call_number = $4

-- name: store_step
-- If a zombie stored the same step first, keep its result: the caller then
-- reads it back, so every run of the handler sees one answer.
INSERT INTO {schema}.step_results (dedup_scope, idempotency_key, step_name, call_number, result)
VALUES ($1, $2, $3, $4, $5::jsonb)
ON CONFLICT (dedup_scope, idempotency_key, step_name, call_number) DO NOTHING

-- name: insert_outbox
INSERT INTO {schema}.outbox (dedup_scope, topic, key, value, header_names, header_values)
VALUES ($1, $2, $3, $4, $5, $6)

-- name: relay_lock
-- One relay per dedup scope at a time keeps the publish order of each key.
SELECT pg_try_advisory_xact_lock(hashtext('consumer.outbox:' || $1))

-- name: unsent
SELECT id, topic, key, value, header_names, header_values
FROM {schema}.outbox
WHERE dedup_scope = $1 AND sent_at IS NULL
ORDER BY id
LIMIT $2

-- name: mark_sent
UPDATE {schema}.outbox
SET sent_at = now(), attempts = attempts + 1
WHERE id = ANY($1::bigint[])

-- name: mark_failed
UPDATE {schema}.outbox
SET attempts = attempts + 1, last_error = $2
WHERE id = $1

-- name: prune_steps
DELETE FROM {schema}.step_results
WHERE ctid IN (
    SELECT ctid FROM {schema}.step_results
    WHERE dedup_scope = $1 AND created_at < now() - make_interval(secs => $2)
    LIMIT $3
)

-- name: prune_outbox
DELETE FROM {schema}.outbox
WHERE id IN (
    SELECT id FROM {schema}.outbox
    WHERE dedup_scope = $1 AND sent_at < now() - make_interval(secs => $2)
    LIMIT $3
)

-- name: outbox_backlog
SELECT count(*) FROM {schema}.outbox WHERE dedup_scope = $1 AND sent_at IS NULL
