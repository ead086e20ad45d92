"""``consumer replay --dry-run`` counts exactly what the replay then applies."""

from __future__ import annotations

import pytest

from tests.replay.conftest import StackFactory
from tests.replay.helpers import order_record

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def test_dry_run_counts_match_replay(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    # N = 6 applied messages: five keyed and one deduplicated by position only.
    old = [order_record(f"k-{n}") for n in range(5)] + [order_record("p-5", keyed=False)]
    await stack.produce(old)
    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 6})
    await stack.stop(worker)

    # M = 5 messages while no worker runs: K = 2 copies of old keys (same
    # payload, new offsets), two new keys and one message without a key.
    new = [order_record("k-1"), order_record("n-1"), order_record("k-3"), order_record("n-2")]
    new.append(order_record("p-10", keyed=False))
    assert await stack.produce(new) == [6, 7, 8, 9, 10]

    before = await rows.positions()
    [plan] = await stack.plan("--to-earliest")

    assert plan["current"] == 6
    assert plan["high_water"] == 6
    assert plan["target"] == 0
    assert plan["end"] == 11
    assert plan["position_duplicates"] == 6
    assert plan["key_duplicates"] == 2
    assert plan["would_apply"] == 3
    assert plan["conflicts"] == 0
    assert plan["would_dead_letter"] == 0
    assert plan["not_retained"] == 0
    assert plan["skipped_forward"] == 0
    assert await rows.positions() == before, "a dry run must not write"

    replayed = await stack.replay("--to-earliest", "--yes")
    assert replayed.exit_code == 0, replayed.stderr
    moved = (await rows.positions())[0]
    assert moved["next_offset"] == 0
    assert moved["high_water"] == 6
    assert moved["epoch"] == 1

    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 11})
    await stack.stop(worker)

    effects = await rows.effects_per_key()
    topic = stack.topic
    assert await rows.effect_count() == 6 + 3
    assert set(effects) == {"k-0", "k-1", "k-2", "k-3", "k-4", f"{topic}/0/5", "n-1", "n-2", f"{topic}/0/10"}
    assert set(effects.values()) == {1}
    position = (await rows.positions())[0]
    assert position["high_water"] == 11
    assert position["reprocess_until"] is None
    assert position["applied"] == 6 + 3
    assert position["key_duplicates"] == 2
    assert position["position_duplicates"] == 6
