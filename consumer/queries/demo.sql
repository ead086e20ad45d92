-- Queries of `consumer demo`. {schema} is the demo's schema.

-- name: drop_framework_schema
DROP SCHEMA IF EXISTS {schema} CASCADE

-- name: drop_example_schema
DROP SCHEMA IF EXISTS quake_store CASCADE

-- name: finished
-- Messages the group is done with: applied, skipped as duplicates, or dead-lettered.
SELECT coalesce(sum(applied + key_duplicates + position_duplicates + dead_lettered), 0)
FROM {schema}.positions
WHERE dedup_scope = $1

-- name: positions
SELECT partition, next_offset FROM {schema}.positions WHERE dedup_scope = $1

-- name: totals
SELECT coalesce(sum(applied), 0) AS applied,
       coalesce(sum(key_duplicates), 0) AS key_duplicates,
       coalesce(sum(position_duplicates), 0) AS position_duplicates,
       coalesce(sum(dead_lettered), 0) AS dead_lettered
FROM {schema}.positions
WHERE dedup_scope = $1

-- name: applied_events
SELECT event_id, count(*) AS n FROM quake_store.applied_events GROUP BY 1

-- name: quakes
SELECT quake_id, updated_at FROM quake_store.quakes

-- name: dead_letters
SELECT count(*) FROM {schema}.dead_letters
