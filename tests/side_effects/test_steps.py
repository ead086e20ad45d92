"""Stored steps of the lead scorer: a retry, a repeated step name and duplicate events reuse stored responses.

The scorer runs as ``consumer run`` subprocesses against the scoring
service of the test, which counts every request it gets.
"""

from __future__ import annotations

import json

import pytest

from tests.side_effects.helpers import TWO_SCORES_SCORER, LeadRows, LeadsDeployment, lead_record, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def test_retry_after_step_reuses_result(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    deployment.start_scorer(hooks={"e-1": {"fail_after_step": 1}})
    deployment.start_counter()

    await deployment.produce([lead_record("e-1")])
    scores = await wait_until(rows.lead_scores, description="the CRM row of lead-e-1")
    counted = await wait_until(rows.scored_events, description="the counter's row of lead-e-1")

    calls = await rows.handler_calls("e-1")
    assert [call["call"] for call in calls] == [1, 2], "the hook fails the first call, so the handler runs twice"
    assert [call["attempt"] for call in calls] == [1, 2]
    assert service.calls_total == 1
    key = calls[0]["score_key"]
    assert service.calls_by_key == {key: 1}
    response = service.responses_by_key[key][0]
    assert scores["lead-e-1"]["score"] == response["score"]
    assert scores["lead-e-1"]["version"] == 1
    stored = await rows.step_results("e-1")
    assert [(row["step_name"], row["call_number"]) for row in stored] == [("score", 1)]
    assert len(await rows.outbox()) == 1, "the failed attempt's publish must have rolled back"
    assert [row["score"] for row in counted] == [response["score"]]


async def test_step_name_repeated_in_one_run_is_numbered(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    deployment.start_scorer(handler=TWO_SCORES_SCORER, hooks={"e-1": {"fail_after_step": 1}})

    await deployment.produce([lead_record("e-1")])
    scores = await wait_until(rows.lead_scores, description="the CRM row of lead-e-1")

    stored = await rows.step_results("e-1")
    assert [(row["step_name"], row["call_number"]) for row in stored] == [("score", 1), ("score", 2)]
    first, second = (json.loads(row["result"]) for row in stored)
    assert first != second, "each numbered call must store its own response"
    assert len(await rows.handler_calls("e-1")) == 2, "the hook fails the first call, so the handler runs twice"
    assert service.calls_without_key == 2, "the retry must reuse both stored responses"
    assert scores["lead-e-1"]["score"] == first["score"]


async def test_duplicate_events_call_service_once_each(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    events = [f"e-{number}" for number in range(4)]
    deployment.start_scorer()
    deployment.start_counter()

    # Each event three times, interleaved, as a producer retrying without idempotence sends them.
    await deployment.produce([lead_record(event_id) for _ in range(3) for event_id in events])

    async def all_scored() -> bool:
        return await rows.next_offset(deployment.scorer_group, deployment.leads_topic) == 12

    async def all_counted() -> bool:
        return await rows.next_offset(deployment.counter_group, deployment.scored_topic) == 4

    await wait_until(all_scored, description="the scorer to apply offsets 0 to 11")
    await wait_until(all_counted, description="the counter to apply 4 lead.scored events")

    assert service.calls_total == 4
    assert sorted(service.calls_by_key.values()) == [1, 1, 1, 1]
    scores = await rows.lead_scores()
    assert {lead_id: row["version"] for lead_id, row in scores.items()} == {f"lead-{e}": 1 for e in events}
    assert len(await rows.handler_calls()) == 4
    position = await rows.position(deployment.scorer_group, deployment.leads_topic)
    assert position is not None
    assert position["key_duplicates"] == 8
    counted = await rows.scored_events()
    assert sorted(row["lead_id"] for row in counted) == sorted(f"lead-{e}" for e in events)
    assert {row["lead_id"]: row["score"] for row in counted} == {
        lead_id: row["score"] for lead_id, row in scores.items()
    }
