"""Derived idempotency keys: equal on every run of a message, different per name and per message.

The handler runs again for a message after a failed attempt (a retry),
after ``consumer replay --reprocess`` and after a crash (the crash windows
are in test_crash_windows). ``consumer replay --to-earliest`` brings back
offsets that were applied, and the worker skips them without a handler call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
import pytest

from tests.integration.helpers import run_cli
from tests.side_effects.helpers import HOOKED_SCORER, LeadRows, LeadsDeployment, expected_key, lead_record, wait_until
from tests.support.process import WorkerProcess

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def _stop(worker: WorkerProcess) -> None:
    worker.terminate()
    exit_code = await anyio.to_thread.run_sync(lambda: worker.wait(30.0))
    assert exit_code == 0, f"worker exited with {exit_code} on SIGTERM\n{worker.output_tail()}"


async def _replay(deployment: LeadsDeployment, *args: str) -> None:
    env = deployment.scorer_env()
    result = await anyio.to_thread.run_sync(
        lambda: run_cli("replay", HOOKED_SCORER, "--topic", deployment.leads_topic, *args, "--yes", env=env)
    )
    assert result.returncode == 0, f"consumer replay failed: {result.returncode}\n{result.stdout}\n{result.stderr}"


def _keys(calls: Sequence[object], column: str) -> set[str]:
    return {call[column] for call in calls}  # type: ignore[index]


async def test_keys_derived_per_message_and_name(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    scope = deployment.scorer_group
    deployment.start_scorer(hooks={"e-1": {"fail_after_step": 1}})

    await deployment.produce([lead_record("e-1"), lead_record("e-2")])

    async def both_applied() -> bool:
        return await rows.next_offset(scope, deployment.leads_topic) == 2

    await wait_until(both_applied, description="the scorer to apply e-1 and e-2")
    first = await rows.handler_calls("e-1")
    second = await rows.handler_calls("e-2")
    assert len(first) == 2, "the hook fails the first call of e-1, so it is retried"
    assert _keys(first, "score_key") == {expected_key(scope, "e-1", "score")}
    assert _keys(first, "crm_key") == {expected_key(scope, "e-1", "crm")}
    assert _keys(second, "score_key") == {expected_key(scope, "e-2", "score")}
    assert deployment.service.calls_by_key.keys() == {
        expected_key(scope, "e-1", "score"),
        expected_key(scope, "e-2", "score"),
    }
    outbox = await rows.outbox()
    published_keys = [dict(zip(row["header_names"], row["header_values"], strict=True)) for row in outbox]
    assert [headers["Idempotency-Key"].decode() for headers in published_keys] == [
        expected_key(scope, "e-1", "publish:1"),
        expected_key(scope, "e-2", "publish:1"),
    ]


async def test_keys_survive_replay_and_reprocess(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    scope = deployment.scorer_group
    service = deployment.service
    worker = deployment.start_scorer(hooks={"e-1": {"fail_after_step": 1}})
    await deployment.produce([lead_record("e-1"), lead_record("e-2")])

    async def applied_up_to(next_offset: int) -> bool:
        return await rows.next_offset(scope, deployment.leads_topic) == next_offset

    await wait_until(lambda: applied_up_to(2), description="the scorer to apply e-1 and e-2")
    await _stop(worker)
    await _replay(deployment, "--to-earliest")
    worker = deployment.start_scorer(hooks={"e-1": {"fail_after_step": 1}})
    # A new event shows when the restarted worker has read past the replayed offsets.
    await deployment.produce([lead_record("e-3")])
    await wait_until(lambda: applied_up_to(3), timeout_s=60, description="the scorer to apply e-3")

    assert len(await rows.handler_calls("e-1")) == 2, "offsets below the high-water mark are skipped"
    assert len(await rows.handler_calls("e-2")) == 1
    assert service.calls_total == 3

    await _stop(worker)
    await _replay(deployment, "--reprocess", "--partition", "0", "--from-offset", "0", "--until-offset", "2")
    deployment.start_scorer(hooks={"e-1": {"fail_after_step": 1}})

    async def reprocessed() -> bool:
        return len(await rows.handler_calls("e-2")) == 2 and await rows.next_offset(scope, deployment.leads_topic) == 3

    await wait_until(reprocessed, timeout_s=60, description="the restarted scorer to apply offsets 0 and 1 again")
    first = await rows.handler_calls("e-1")
    second = await rows.handler_calls("e-2")
    assert len(first) == 3
    assert _keys(first, "score_key") == {expected_key(scope, "e-1", "score")}
    assert _keys(second, "score_key") == {expected_key(scope, "e-2", "score")}
    assert service.calls_total == 3, "a reprocessed message reuses its stored step result"
    scores = await rows.lead_scores()
    assert {lead_id: row["version"] for lead_id, row in scores.items()} == {
        "lead-e-1": 2,
        "lead-e-2": 2,
        "lead-e-3": 1,
    }
    outbox = await rows.outbox()
    published = [json.loads(row["value"])["event_id"] for row in outbox]
    assert published == ["e-1", "e-2", "e-3", "e-1", "e-2"]
    header_keys = [dict(zip(row["header_names"], row["header_values"], strict=True)) for row in outbox]
    assert header_keys[3]["Idempotency-Key"] == header_keys[0]["Idempotency-Key"], (
        "a reprocessed publish carries the key of the first publish, so a deduplicating consumer skips it"
    )
