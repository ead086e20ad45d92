"""A new consumer group that shares the old group's dedup scope applies nothing the old group applied."""

from __future__ import annotations

import uuid

import pytest

from tests.replay.conftest import StackFactory
from tests.replay.helpers import order_record

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def test_shared_scope_new_group_no_duplicates(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    old_group = stack.group_id
    await stack.produce([order_record(f"k-{n}", keyed=n != 2) for n in range(6)])
    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 6})
    await stack.stop(worker)
    # Re-published copies of two old orders, and one new order.
    assert await stack.produce([order_record("k-1"), order_record("k-4"), order_record("n-1")]) == [6, 7, 8]

    new_group = f"replay-new-{uuid.uuid4().hex[:8]}"
    shared = {"group_id": new_group, "dedup_scope": old_group}
    [plan] = await stack.plan("--to-earliest", **shared)
    assert plan["position_duplicates"] == 6
    assert plan["key_duplicates"] == 2
    assert plan["would_apply"] == 1
    result = await stack.replay("--to-earliest", "--yes", **shared)
    assert result.exit_code == 0, result.stderr

    worker = await stack.started(**shared)
    await rows.wait_for_next_offsets({0: 9}, scope=old_group)
    await stack.stop(worker)

    effects = await rows.effects_per_key()
    assert await rows.effect_count() == 7
    assert set(effects) == {"k-0", "k-1", f"{stack.topic}/0/2", "k-3", "k-4", "k-5", "n-1"}
    position = (await rows.positions(old_group))[0]
    assert position["group_id"] == new_group
    assert position["key_duplicates"] == 2
    assert await rows.positions(new_group) == {}, "the new group keeps no positions of its own"
