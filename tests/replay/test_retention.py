"""Dedup-record pruning: positions keep replays a no-op, keys expire at the horizon, and pruning never stalls.

Key deduplication lasts as long as a key's ``inbox`` row, while position
deduplication (the high-water mark) never expires.
"""

from __future__ import annotations

import time

import anyio
import asyncpg
import pytest

from tests.replay.conftest import StackFactory
from tests.replay.helpers import (
    Rows,
    commit_kafka_offsets,
    order_record,
    records_with_action,
    wait_for_skipped,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]

# Sampling period of pg_stat_activity, and the longest a prune statement may run.
SAMPLE_INTERVAL_S = 0.2
MAX_PRUNE_STATEMENT_S = 2.0

# Statements of the `prune_batch` query in consumer/queries/replay.sql.
ACTIVE_PRUNE_STATEMENTS = """
SELECT coalesce(max(extract(epoch FROM clock_timestamp() - query_start)), 0)::float8 AS longest_s,
       count(*) AS running
FROM pg_stat_activity
WHERE datname = current_database() AND state = 'active'
  AND query LIKE '%DELETE FROM%inbox%' AND query LIKE '%SKIP LOCKED%'
"""

INSERT_INBOX_ROWS = """
INSERT INTO consumer.inbox (dedup_scope, idempotency_key, topic, partition, "offset", fingerprint, claimed_at)
SELECT $1, $2 || n, $3, 0, n, '\\x00'::bytea, now() - make_interval(secs => $4)
FROM generate_series(1, $5) AS n
"""


async def test_replay_after_pruning_applies_nothing(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    retention = {"worker__inbox_retention_s": "1", "worker__prune_interval_s": "1"}
    await stack.produce([order_record(f"k-{n}") for n in range(8)])
    worker = await stack.started(**retention)
    await rows.wait_for_next_offsets({0: 8})
    await wait_until(lambda: _inbox_empty(rows), timeout_s=30, description="the worker to prune every dedup record")

    [plan] = await stack.plan("--to-earliest", **retention)
    assert plan["position_duplicates"] == 8
    assert plan["would_apply"] == 0
    refused = await stack.replay("--to-earliest", "--yes", **retention)
    assert refused.exit_code == 2
    assert "older than the dedup horizon" in refused.stderr
    replayed = await stack.replay("--to-earliest", "--yes", "--force", **retention)
    assert replayed.exit_code == 0, replayed.stderr

    # A new order makes the running worker find the replay and read the
    # topic again from offset 0.
    await stack.produce([order_record("k-8")])
    await rows.wait_for_next_offsets({0: 9})
    await stack.stop(worker)

    effects = await rows.effects_per_key()
    assert effects == {f"k-{n}": 1 for n in range(9)}
    assert records_with_action(worker, "replay_followed") != []
    [stopped] = records_with_action(worker, "worker_stopped")
    assert stopped["applied"] == 9
    assert stopped["position_duplicates"] == 8


async def _inbox_empty(rows: Rows) -> bool:
    return await rows.inbox_count() == 0


async def test_prune_under_load_keeps_statements_short(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    expired, fresh, produced = 200_000, 100, 1_000
    connection = rows.connection
    await connection.execute(INSERT_INBOX_ROWS, stack.group_id, "expired-", stack.topic, 2 * 86_400.0, expired)
    await connection.execute(INSERT_INBOX_ROWS, stack.group_id, "fresh-", stack.topic, 0.0, fresh)
    worker = await stack.started()

    longest_s = 0.0
    samples_while_running = 0
    pruning_done = anyio.Event()

    async def sample() -> None:
        nonlocal longest_s, samples_while_running
        sampler = await asyncpg.connect(stack.database_url)
        try:
            while not pruning_done.is_set():
                row = await sampler.fetchrow(ACTIVE_PRUNE_STATEMENTS)
                assert row is not None
                longest_s = max(longest_s, row["longest_s"])
                samples_while_running += 1 if row["running"] else 0
                await anyio.sleep(SAMPLE_INTERVAL_S)
        finally:
            await sampler.close()

    async def prune() -> None:
        try:
            result = await stack.command("prune", "--group", stack.group_id, "--older-than", "86400")
        finally:
            pruning_done.set()
        assert result.exit_code == 0, result.stderr
        assert f"deleted {expired} dedup records" in result.stdout

    async def produce() -> None:
        # Ten bursts spread over about two seconds, so consuming overlaps pruning.
        for burst in range(10):
            await stack.produce([order_record(f"load-{burst}-{n}") for n in range(produced // 10)])
            await anyio.sleep(0.2)

    started = time.monotonic()
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(sample)
        task_group.start_soon(prune)
        task_group.start_soon(produce)
    pruning_s = time.monotonic() - started
    await rows.wait_for_next_offsets({0: produced})
    await stack.stop(worker)

    assert longest_s < MAX_PRUNE_STATEMENT_S, f"a prune statement ran {longest_s:.2f} s"
    assert samples_while_running > 0, f"no sample saw a prune statement in {pruning_s:.1f} s of pruning"
    assert await rows.effect_count() == produced
    assert set((await rows.effects_per_key()).values()) == {1}
    remaining = await connection.fetch(
        "SELECT split_part(idempotency_key, '-', 1) AS kind, count(*) AS n FROM consumer.inbox"
        " WHERE dedup_scope = $1 GROUP BY 1",
        stack.group_id,
    )
    assert {row["kind"]: row["n"] for row in remaining} == {"fresh": fresh, "load": produced}


async def test_key_outside_horizon_applies_again(make_stack: StackFactory) -> None:
    """Positions stop redelivered and replayed offsets, but a copy of a key past the horizon applies again."""
    stack, rows = await make_stack(1)
    horizon = {"worker__inbox_retention_s": "2"}
    await stack.produce([order_record(f"k-{n}") for n in (1, 2, 3)])
    worker = await stack.started(**horizon)
    await rows.wait_for_next_offsets({0: 3})
    await stack.stop(worker)

    await anyio.sleep(2.5)
    pruned = await stack.command("prune", "--group", stack.group_id, **horizon)
    assert pruned.exit_code == 0, pruned.stderr
    assert "deleted 3 dedup records" in pruned.stdout
    assert await rows.inbox_count() == 0

    # Kafka's committed offset goes back to 0, and PostgreSQL's position wins.
    await commit_kafka_offsets(stack.bootstrap, stack.group_id, stack.topic, {0: 0})
    worker = await stack.started(**horizon)
    await anyio.sleep(2.0)
    await stack.stop(worker)
    assert await rows.effect_count() == 3
    assert await rows.next_offsets() == {0: 3}

    replayed = await stack.replay("--to-offset", "0", "--yes", "--force", **horizon)
    assert replayed.exit_code == 0, replayed.stderr
    assert await rows.next_offsets() == {0: 0}
    worker = await stack.started(log__level="DEBUG", **horizon)
    await wait_for_skipped(worker, 3)
    await stack.stop(worker)
    assert await rows.effect_count() == 3
    [stopped] = records_with_action(worker, "worker_stopped")
    assert stopped["applied"] == 0

    # The same order again at a new offset, after its dedup record was pruned.
    assert await stack.produce([order_record("k-2")]) == [3]
    worker = await stack.started(log__level="DEBUG", **horizon)
    await rows.wait_for_next_offsets({0: 4})
    await stack.stop(worker)

    assert await rows.effects_per_key() == {"k-1": 1, "k-2": 2, "k-3": 1}
    applied = [record for record in records_with_action(worker, "batch_committed") if record["applied"]]
    assert [(record["applied"], record["offset"]) for record in applied] == [(1, 4)]
    assert records_with_action(worker, "worker_stopped")[0]["key_duplicates"] == 0
