-- Queries of `consumer replay` and `consumer prune`. {schema} is the configured schema name.

-- name: lock_positions
-- Taking the fence rows makes a replay wait for in-flight batches, and the
-- batches after it see the new epoch: there is no moment when a worker
-- applies from the old position while the new one is stored.
SELECT partition, next_offset, high_water, reprocess_until, epoch
FROM {schema}.positions
WHERE dedup_scope = $1 AND topic = $2 AND partition = ANY($3::integer[])
ORDER BY partition
FOR UPDATE

-- name: move_position
INSERT INTO {schema}.positions (dedup_scope, topic, partition, next_offset, high_water, group_id, epoch)
VALUES ($1, $2, $3, $4, $4, $5, 1)
ON CONFLICT (dedup_scope, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset,
    reprocess_until = NULL,
    epoch = {schema}.positions.epoch + 1,
    updated_at = now()

-- name: start_reprocess
UPDATE {schema}.positions
SET next_offset = $4,
    reprocess_until = $5,
    epoch = epoch + 1,
    updated_at = now()
WHERE dedup_scope = $1 AND topic = $2 AND partition = $3

-- name: clear_range
-- Dedup records of exactly the reprocessed range, so its keys apply again.
DELETE FROM {schema}.inbox
WHERE dedup_scope = $1 AND topic = $2 AND partition = $3 AND "offset" >= $4 AND "offset" < $5

-- name: stored_keys
SELECT idempotency_key, fingerprint, topic, partition, "offset"
FROM {schema}.inbox
WHERE dedup_scope = $1 AND idempotency_key = ANY($2::text[])

-- name: prune_batch
-- One short transaction per batch; SKIP LOCKED leaves claims of in-flight
-- batches alone, so pruning never waits on the consumer and never blocks it.
WITH expired AS (
    SELECT idempotency_key
    FROM {schema}.inbox
    WHERE dedup_scope = $1 AND claimed_at < now() - make_interval(secs => $2)
    ORDER BY claimed_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.inbox AS inbox
USING expired
WHERE inbox.dedup_scope = $1 AND inbox.idempotency_key = expired.idempotency_key

-- name: scopes
SELECT DISTINCT dedup_scope FROM {schema}.positions ORDER BY 1

-- name: count_expired
SELECT count(*)
FROM {schema}.inbox
WHERE dedup_scope = $1 AND claimed_at < now() - make_interval(secs => $2)

-- name: positions_of_topic
SELECT partition, next_offset, high_water, reprocess_until
FROM {schema}.positions
WHERE dedup_scope = $1 AND topic = $2
