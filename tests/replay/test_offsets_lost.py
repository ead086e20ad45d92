"""A stored position the broker no longer holds, and where a group without any position starts."""

from __future__ import annotations

import uuid

import anyio
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.replay.conftest import StackFactory
from tests.replay.helpers import order_record, records_with_action

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def _delete_records_before(bootstrap: str, topic: str, partition: int, offset: int) -> None:
    """Move the log start of `topic`-`partition` to `offset`, as retention would."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, partition): RecordsToDelete(before_offset=offset)}, 10_000)
    finally:
        await admin.close()


async def test_deleted_offsets_reported(make_stack: StackFactory, kafka_is_tansu: bool) -> None:
    if kafka_is_tansu:
        pytest.skip(
            "Tansu 0.6 closes the connection on DeleteRecords, so the log start cannot move. "
            "Set CONSUMER_TEST_KAFKA_BOOTSTRAP to run this against Kafka."
        )
    stack, rows = await make_stack(1)
    stopping_group = f"replay-stop-{uuid.uuid4().hex[:8]}"
    await stack.produce([order_record(f"k-{n}") for n in (1, 2, 3)])
    for group_id in (stack.group_id, stopping_group):
        worker = await stack.started(group_id=group_id, test_worker=group_id)
        await rows.wait_for_next_offsets({0: 3}, scope=group_id)
        await stack.stop(worker)
    assert await stack.produce([order_record(f"k-{n}") for n in (4, 5, 6)]) == [3, 4, 5]
    await _delete_records_before(stack.bootstrap, stack.topic, 0, 5)
    assert await stack.produce([order_record("k-7")]) == [6]

    worker = await stack.started(test_worker=stack.group_id)
    await rows.wait_for_next_offsets({0: 7})
    await stack.stop(worker)

    assert await rows.effects_per_key(stack.group_id) == {"k-1": 1, "k-2": 1, "k-3": 1, "k-6": 1, "k-7": 1}
    [lost] = records_with_action(worker, "offsets_lost")
    assert lost["level"] == "ERROR"
    assert lost["topic"] == stack.topic
    assert lost["partition"] == 0
    lost_range = f"offsets 3 to 4 of {stack.topic}-0 were deleted before they were applied (2 messages lost)"
    assert lost_range in lost["message"]
    assert records_with_action(worker, "worker_stopped")[0]["offsets_lost"] == 2

    [plan] = await stack.plan("--to-offset", "0")
    assert plan["target"] == 0
    assert plan["log_start"] == 5
    assert plan["end"] == 7
    assert plan["not_retained"] == 5
    assert plan["position_duplicates"] == 2
    assert plan["would_apply"] == 0
    replayed = await stack.replay("--to-offset", "0", "--yes")
    assert replayed.exit_code == 0, replayed.stderr
    assert await rows.next_offsets() == {0: 5}, "a replay below the log start moves to the log start"

    stopping = stack.start(group_id=stopping_group, test_worker=stopping_group, worker__on_offsets_lost="stop")
    exit_code = await anyio.to_thread.run_sync(lambda: stopping.wait(timeout_s=60))
    assert exit_code == 1, stopping.output_tail()
    last_line = stopping.read_stderr().strip().splitlines()[-1]
    assert last_line.startswith(f"error: {stack.topic}-0: offsets 3 to 4 were deleted before they were applied")
    [stop_lost] = records_with_action(stopping, "offsets_lost")
    assert "continuing" not in stop_lost["message"], "a worker that stops must not log that it continues"
    assert await rows.next_offsets(stopping_group) == {0: 3}
    assert await rows.effects_per_key(stopping_group) == {"k-1": 1, "k-2": 1, "k-3": 1}


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_new_group_logs_auto_offset_reset(make_stack: StackFactory, reset: str) -> None:
    stack, _ = await make_stack(1)
    await stack.produce([order_record("k-1")])

    worker = await stack.started(kafka__auto_offset_reset=reset)
    await stack.stop(worker)

    [started] = records_with_action(worker, "worker_started")
    assert started["auto_offset_reset"] == reset
    assert f"auto_offset_reset={reset}" in started["message"]
    [default] = records_with_action(worker, "partition_position_default")
    assert default["topic"] == stack.topic
    assert default["partition"] == 0
    assert f"else auto_offset_reset={reset}" in default["message"]
