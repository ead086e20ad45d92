"""``consumer replay --reprocess`` applies one offset range of one partition once more, and nothing else."""

from __future__ import annotations

import pytest

from tests.replay.conftest import StackFactory
from tests.replay.helpers import Rows, Stack, order_record

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]

RANGE = ("--reprocess", "--partition", "0", "--from-offset", "3", "--until-offset", "6")


async def _apply_ten(stack: Stack, rows: Rows) -> None:
    """Apply k-0 to k-9 at offsets 0 to 9, with offset 4 keyed by position only, and stop the worker."""
    records = [order_record(f"k-{n}", keyed=n != 4) for n in range(10)]
    assert await stack.produce(records) == list(range(10))
    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 10})
    await stack.stop(worker)


def _expected_effects(topic: str, twice: set[int]) -> dict[str, int]:
    keys = {n: (f"{topic}/0/4" if n == 4 else f"k-{n}") for n in range(10)}
    return {key: (2 if n in twice else 1) for n, key in keys.items()}


async def test_reprocess_reapplies_range_once(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    await _apply_ten(stack, rows)

    [plan] = await stack.plan(*RANGE)
    assert plan["would_apply"] == 3
    assert plan["position_duplicates"] == 4
    assert plan["key_duplicates"] == 0

    result = await stack.replay(*RANGE, "--yes")
    assert result.exit_code == 0, result.stderr
    # Offset 4 has no dedup record: it is deduplicated by position.
    assert "cleared 2 dedup records" in result.stdout
    position = (await rows.positions())[0]
    assert position["next_offset"] == 3
    assert position["reprocess_until"] == 6
    assert position["high_water"] == 10
    assert position["epoch"] == 1

    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 10})
    await stack.stop(worker)

    assert await rows.effects_per_key() == _expected_effects(stack.topic, twice={3, 4, 5})
    position = (await rows.positions())[0]
    assert position["reprocess_until"] is None
    assert position["high_water"] == 10
    assert await rows.inbox_count() == 9


async def test_reprocess_without_yes_changes_nothing(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    await _apply_ten(stack, rows)
    first = await stack.replay(*RANGE, "--yes")
    assert first.exit_code == 0, first.stderr
    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 10})
    await stack.stop(worker)
    positions = await rows.positions()
    inbox = await rows.inbox_count()

    second = await stack.replay(*RANGE)

    assert second.exit_code == 2, second.stdout
    assert "pass --yes" in second.stderr
    assert await rows.positions() == positions
    assert await rows.inbox_count() == inbox
    assert await rows.effects_per_key() == _expected_effects(stack.topic, twice={3, 4, 5})


async def test_reprocess_past_high_water_is_rejected(make_stack: StackFactory) -> None:
    stack, rows = await make_stack(1)
    await _apply_ten(stack, rows)
    positions = await rows.positions()

    result = await stack.replay(
        "--reprocess", "--partition", "0", "--from-offset", "8", "--until-offset", "11", "--yes"
    )

    assert result.exit_code == 2, result.stdout
    assert "--until-offset 11 is past what was applied (10)" in result.stderr
    assert await rows.positions() == positions
    assert await rows.inbox_count() == 9
    assert await rows.effects_per_key() == _expected_effects(stack.topic, twice=set())
