"""SIGKILL of the lead scorer in each window of a scored lead's life, and what the restart repeats.

Windows, in the order a lead passes them:

1. the scoring request is in flight: the restart sends it again, with the
   same Idempotency-Key, so a deduplicating service returns its stored response;
2. the response is stored as a step result, the batch is not committed: the
   restart reuses the stored response without calling;
3. the batch committed, Kafka's offset did not: the restart seeks to the
   position stored in PostgreSQL and calls nothing again;
4. the relay sent lead.scored, the outbox row is not marked sent: the
   restart sends it again, and the downstream counter applies it once.
"""

from __future__ import annotations

import json

import anyio
import asyncpg
import pytest

from tests.side_effects.helpers import LeadRows, LeadsDeployment, lead_record, wait_until
from tests.support import kafka
from tests.support.process import WorkerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.chaos]


async def _kill(worker: WorkerProcess) -> None:
    worker.kill()
    exit_code = await anyio.to_thread.run_sync(lambda: worker.wait(30.0))
    assert exit_code == -9, f"worker exited with {exit_code} instead of being killed\n{worker.output_tail()}"


async def test_kill_during_call_resends_same_key(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    service.delay_s = 4.0
    worker = deployment.start_scorer()
    deployment.start_counter()

    await deployment.produce([lead_record("e-1")])

    async def request_in_flight() -> bool:
        return service.calls_total >= 1

    await wait_until(request_in_flight, description="the scoring request of e-1")
    await _kill(worker)
    assert await rows.step_results() == [], "the response never reached the worker, so no result can be stored"
    service.delay_s = 0.0
    deployment.start_scorer()
    scores = await wait_until(rows.lead_scores, description="the CRM row of lead-e-1")

    calls = await rows.handler_calls("e-1")
    assert len(calls) == 2
    assert calls[0]["score_key"] == calls[1]["score_key"]
    key = calls[0]["score_key"]
    assert service.calls_total == 2, "the call in flight at the kill is sent again"
    assert service.calls_by_key == {key: 2}
    first_response, second_response = service.responses_by_key[key]
    assert second_response == first_response, "the service deduplicates on the key"
    assert scores["lead-e-1"]["score"] == first_response["score"]
    assert scores["lead-e-1"]["version"] == 1
    stored = await rows.step_results("e-1")
    assert [json.loads(row["result"])["score"] for row in stored] == [first_response["score"]]
    counted = await wait_until(rows.scored_events, description="the counter's row of lead-e-1")
    assert len(await rows.outbox()) == 1
    assert [row["score"] for row in counted] == [first_response["score"]]


async def test_kill_after_step_stored_reuses_result(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    hooks = {"e-1": {"sleep_after_step_s": 60}}
    worker = deployment.start_scorer(hooks=hooks)
    deployment.start_counter()

    await deployment.produce([lead_record("e-1")])
    await wait_until(lambda: rows.step_results("e-1"), description="the stored step result of e-1")
    assert await rows.lead_scores() == {}, "the batch must still be open"
    await _kill(worker)
    assert await rows.outbox() == [], "the killed batch's publish must have rolled back"
    deployment.start_scorer(hooks=hooks)
    scores = await wait_until(rows.lead_scores, description="the CRM row of lead-e-1")
    counted = await wait_until(rows.scored_events, description="the counter's row of lead-e-1")

    calls = await rows.handler_calls("e-1")
    assert len(calls) == 2, "the message is redelivered to the restarted worker"
    assert calls[0]["pid"] != calls[1]["pid"]
    assert calls[0]["score_key"] == calls[1]["score_key"]
    assert service.calls_total == 1
    assert scores["lead-e-1"]["version"] == 1
    # Give a second copy time to arrive before counting the counter's rows.
    await anyio.sleep(2.0)
    counted = await rows.scored_events()
    assert [row["lead_id"] for row in counted] == ["lead-e-1"]
    assert counted[0]["score"] == scores["lead-e-1"]["score"]


async def test_kill_before_kafka_commit_repeats_nothing(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    # Kafka's committed offset is only a mirror for lag tools; an hour keeps it from being written.
    worker = deployment.start_scorer(worker__kafka_commit_interval_s=3600)
    deployment.start_counter()

    await deployment.produce([lead_record(f"e-{number}") for number in range(3)])

    async def three_scored_and_sent() -> bool:
        outbox = await rows.outbox()
        return len(await rows.lead_scores()) == 3 and len(outbox) == 3 and all(row["sent_at"] for row in outbox)

    await wait_until(three_scored_and_sent, description="three CRM rows and three sent outbox rows")
    await _kill(worker)
    committed = await kafka.fetch_committed(deployment.bootstrap, deployment.scorer_group, deployment.leads_topic, 1)
    assert committed == {0: None}, "the worker must have died before committing to Kafka"

    deployment.start_scorer(worker__kafka_commit_interval_s=3600)
    # A later event shows when the restarted worker has read past the first three.
    await deployment.produce([lead_record("e-3")])

    async def four_counted() -> bool:
        return await rows.next_offset(deployment.counter_group, deployment.scored_topic) == 4

    await wait_until(four_counted, description="the counter to apply 4 lead.scored events")
    assert service.calls_total == 4
    assert sorted(service.calls_by_key.values()) == [1, 1, 1, 1]
    assert [call["event_id"] for call in await rows.handler_calls()] == ["e-0", "e-1", "e-2", "e-3"]
    scores = await rows.lead_scores()
    assert {row["version"] for row in scores.values()} == {1}
    assert len(await rows.scored_events()) == 4


async def test_kill_before_outbox_marked_sent(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    relay_lock = await rows.connection.fetchval(
        "SELECT hashtext('consumer.outbox:' || $1)::bigint", deployment.scorer_group
    )
    # Holding the relay's advisory lock keeps the relay from sending until
    # this test has locked the outbox row of e-1.
    await rows.connection.execute("SELECT pg_advisory_lock($1)", relay_lock)
    worker = deployment.start_scorer()
    deployment.start_counter()

    await deployment.produce([lead_record("e-1")])
    await wait_until(rows.outbox, description="the outbox row of e-1")
    transaction = rows.connection.transaction()
    await transaction.start()
    await rows.connection.execute(
        "SELECT id FROM consumer.outbox WHERE dedup_scope = $1 FOR UPDATE", deployment.scorer_group
    )
    await rows.connection.execute("SELECT pg_advisory_unlock($1)", relay_lock)
    # The relay that found the lock taken waits for the next publish, so e-2 wakes it.
    await deployment.produce([lead_record("e-2")])

    # The relay marks rows sent only after the broker acknowledged all of
    # them, so an UPDATE waiting on this test's row lock means the send is done.
    watcher = await asyncpg.connect(deployment.database_url)
    try:

        async def relay_waits_on_row() -> bool:
            waiting: int = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE%outbox%'"
            )
            return waiting == 1

        await wait_until(relay_waits_on_row, description="the relay's UPDATE of the outbox row to wait on the lock")
    finally:
        await watcher.close()
    await _kill(worker)
    await transaction.rollback()
    outbox = await rows.outbox()
    assert outbox[0]["sent_at"] is None, "the kill came before e-1's row was marked sent"

    deployment.start_scorer()

    async def rows_sent() -> bool:
        outbox = await rows.outbox()
        return len(outbox) == 2 and all(row["sent_at"] is not None for row in outbox)

    async def copies_handled() -> int:
        next_offset = await rows.next_offset(deployment.counter_group, deployment.scored_topic)
        return next_offset if next_offset is not None and next_offset >= 3 else 0

    await wait_until(rows_sent, timeout_s=60, description="the restarted relay to mark both rows sent")
    await wait_until(copies_handled, description="the counter to handle e-1's second copy")
    copies = await deployment.read_topic(deployment.scored_topic, 3)
    first_lead = [copy for copy in copies if json.loads(copy.value or b"{}")["event_id"] == "e-1"]
    assert len(first_lead) == 2, "e-1 was acknowledged by the broker, then sent again after the restart"
    keys = [dict(copy.headers)["Idempotency-Key"] for copy in first_lead]
    assert keys[0] == keys[1], "both copies must carry the outbox row's key"
    assert first_lead[0].value == first_lead[1].value
    counted = await rows.scored_events()
    assert sorted(row["lead_id"] for row in counted) == ["lead-e-1", "lead-e-2"]
    position = await rows.position(deployment.counter_group, deployment.scored_topic)
    assert position is not None
    assert position["key_duplicates"] >= 1
    assert position["key_duplicates"] == position["next_offset"] - 2, "each copy after an event's first is skipped"
    assert deployment.service.calls_total == 2
