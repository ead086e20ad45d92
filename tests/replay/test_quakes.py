"""Replaying the quake-store example over real USGS data changes no row.

The worker runs in the test process, so the test can tell from its counters
when it has read the whole replayed range.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from consumer.worker import Worker
from examples.quakes.handler import QuakeHandler
from tests.integration import helpers as integration
from tests.replay.conftest import StackFactory
from tests.replay.helpers import wait_until
from tests.support import kafka
from tests.support.process import REPO_ROOT

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

QUAKE_HANDLER = "examples.quakes.handler:QuakeHandler"
DATA = REPO_ROOT / "examples" / "quakes" / "data" / "usgs-all-day-2025-05-20.jsonl"
# The first lines of the sample keep the test short. They hold repeated
# polls of the same events, as the whole file does.
LINES = 600
PARTITIONS = 2


def _records(path: Path, count: int) -> list[kafka.Record]:
    """Read the first `count` events, each to a partition chosen by its earthquake id as a keyed producer would."""
    records = []
    with path.open("rb") as lines:
        for _, line in zip(range(count), lines, strict=False):
            entity_id = json.loads(line)["entity"]["id"]
            partition = zlib.crc32(entity_id.encode()) % PARTITIONS
            records.append(kafka.Record(partition=partition, key=entity_id.encode(), value=line.rstrip(b"\n")))
    return records


async def _snapshot(connection: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
    quakes = await connection.fetch("SELECT * FROM quake_store.quakes ORDER BY quake_id")
    events = await connection.fetch(
        "SELECT event_id, quake_id, applied_at FROM quake_store.applied_events ORDER BY event_id, applied_at"
    )
    return [tuple(row) for row in quakes], [tuple(row) for row in events]


async def _skipped(worker: Worker, count: int) -> bool:
    return worker.stats.position_duplicates >= count


async def test_quake_replay_changes_no_row(make_stack: StackFactory, kafka_bootstrap: str, database_url: str) -> None:
    stack, rows = await make_stack(PARTITIONS, handler=QUAKE_HANDLER)
    records = _records(DATA, LINES)
    offsets = await stack.produce(records)
    ends: dict[int, int] = {}
    for record, offset in zip(records, offsets, strict=True):
        ends[record.partition] = max(ends.get(record.partition, 0), offset + 1)
    config = integration.worker_settings(kafka_bootstrap, database_url, stack.topic, stack.group_id)

    async with integration.running_worker(QuakeHandler(), config, partitions=PARTITIONS) as worker:
        await rows.wait_for_next_offsets(ends)
    assert worker.stats.applied > 0
    before = await _snapshot(rows.connection)
    events = {json.loads(record.value or b"")["event_id"] for record in records}
    quakes = {record.key for record in records}
    assert len(before[1]) == len(events), "each event applied once"
    assert len(before[0]) == len(quakes)

    plans = await stack.plan("--to-earliest")
    assert [plan["would_apply"] for plan in plans] == [0] * PARTITIONS
    assert [plan["position_duplicates"] for plan in plans] == [ends[p] for p in range(PARTITIONS)]
    for plan in plans:
        assert plan["key_duplicates"] == 0
        assert plan["conflicts"] == 0
        assert plan["would_dead_letter"] == 0
        assert plan["not_retained"] == 0
    replayed = await stack.replay("--to-earliest", "--yes")
    assert replayed.exit_code == 0, replayed.stderr

    async with integration.running_worker(QuakeHandler(), config, partitions=PARTITIONS) as worker:
        await wait_until(lambda: _skipped(worker, LINES), timeout_s=60, description=f"{LINES} duplicates skipped")

    assert worker.stats.applied == 0
    assert worker.stats.position_duplicates == LINES
    assert await _snapshot(rows.connection) == before
