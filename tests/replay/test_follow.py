"""Workers catch up with a moved position: the stored position ends at the log end again."""

from __future__ import annotations

import pytest

from tests.replay.conftest import StackFactory
from tests.replay.helpers import order_record, records_with_action, wait_for_skipped

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def test_replay_restores_end_position(make_stack: StackFactory) -> None:
    """After a replay over offsets that were all applied, the worker stores the log end again, not the target."""
    stack, rows = await make_stack(1)
    await stack.produce([order_record(f"k-{n}") for n in range(5)])
    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 5})
    await stack.stop(worker)
    result = await stack.replay("--to-earliest", "--yes")
    assert result.exit_code == 0, result.stderr

    worker = await stack.started(log__level="DEBUG")
    await wait_for_skipped(worker, 5)

    # The worker has read every replayed message, and each was a duplicate.
    await rows.wait_for_next_offsets({0: 5}, timeout_s=10)
    await stack.stop(worker)
    assert await rows.effect_count() == 5
    assert records_with_action(worker, "worker_stopped")[0]["position_duplicates"] == 5


async def test_reprocess_reaches_idle_worker(make_stack: StackFactory) -> None:
    """A running worker with nothing new to fetch applies a reprocessed range without a restart."""
    stack, rows = await make_stack(1)
    await stack.produce([order_record(f"k-{n}") for n in range(6)])
    worker = await stack.started()
    await rows.wait_for_next_offsets({0: 6})

    result = await stack.replay("--reprocess", "--partition", "0", "--from-offset", "2", "--until-offset", "4", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "running workers apply the range after their in-flight batch" in result.stdout

    await rows.wait_for_next_offsets({0: 6}, timeout_s=30)
    await stack.stop(worker)
    assert await rows.effects_per_key() == {f"k-{n}": (2 if n in (2, 3) else 1) for n in range(6)}
