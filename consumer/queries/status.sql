-- Queries of `consumer status`. {schema} is the configured schema name.

-- name: partitions
-- One row per stored position, with its running totals and the dead letters
-- still waiting for a redrive or purge. $1 is a dedup scope, or NULL for all.
-- A partition appears once a batch of it has committed.
SELECT p.dedup_scope,
       p.topic,
       p.partition,
       p.group_id,
       p.next_offset,
       p.high_water,
       p.applied,
       p.position_duplicates,
       p.key_duplicates,
       p.dead_lettered,
       p.updated_at,
       coalesce(d.dead, 0) AS dead_letters_dead,
       coalesce(d.parked, 0) AS dead_letters_parked
FROM {schema}.positions AS p
LEFT JOIN (
    SELECT dedup_scope,
           topic,
           partition,
           count(*) FILTER (WHERE status = 'dead') AS dead,
           count(*) FILTER (WHERE status = 'parked') AS parked
    FROM {schema}.dead_letters
    WHERE status IN ('dead', 'parked') AND ($1::text IS NULL OR dedup_scope = $1)
    GROUP BY dedup_scope, topic, partition
) AS d USING (dedup_scope, topic, partition)
WHERE $1::text IS NULL OR p.dedup_scope = $1
ORDER BY p.dedup_scope, p.topic, p.partition

-- name: inbox_rows
SELECT count(*) FROM {schema}.inbox WHERE dedup_scope = $1
