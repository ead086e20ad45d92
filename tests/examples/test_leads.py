"""The lead-scoring example through the testing kit: a stored step, a derived key and the outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from consumer import Context, Message
from consumer.testing import InboxHarness

# examples/leads is written alongside the kit; without it these tests are skipped, not failed.
leads = pytest.importorskip("examples.leads.handler", reason="examples.leads.handler is not in this checkout")
scoring = pytest.importorskip("examples.leads.scoring_service", reason="examples.leads.scoring_service is missing")
downstream = pytest.importorskip("examples.leads.downstream", reason="examples.leads.downstream is missing")

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HarnessFactory = Callable[..., InboxHarness]
COUNT_SCORES = "SELECT count(*) FROM crm.lead_scores WHERE event_id = $1 AND version = 1"
COUNT_SCORED_EVENTS = "SELECT count(*) FROM crm.scored_events WHERE event_key = $1"


def lead(event_id: str, lead_id: str = "lead-1") -> dict[str, Any]:
    return {"event_id": event_id, "lead_id": lead_id, "email": f"{lead_id}@example.com", "employees": 120}


@pytest.fixture
async def scoring_service(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """The example's scoring API on 127.0.0.1, with LEAD_SCORER_URL pointing at it."""
    service = scoring.ScoringService()
    async with anyio.create_task_group() as task_group:
        await task_group.start(service.serve)
        monkeypatch.setenv(leads.SCORER_URL_VAR, service.url)
        yield service
        task_group.cancel_scope.cancel()


class CrashAfterScoring(leads.LeadScorer):
    """Fails once after the score was stored and the effects written, as a crash before the commit would."""

    crashed = False

    async def handle(self, message: Message[Any], context: Context) -> None:
        await super().handle(message, context)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("injected failure after the scoring call")


async def test_lead_delivered_twice_is_scored_once(consumer_harness: HarnessFactory, scoring_service: Any) -> None:
    harness = consumer_harness(leads.LeadScorer)

    first, second = await harness.deliver_twice(lead("e-1"))

    assert first.applied == 1
    assert second.key_duplicates == 1
    assert scoring_service.calls_total == 1
    await harness.assert_applied_once("e-1", effects=COUNT_SCORES)
    outbox = await harness.state.outbox()
    assert [row["topic"] for row in outbox] == ["lead.scored"]


async def test_retry_reuses_the_stored_score(consumer_harness: HarnessFactory, scoring_service: Any) -> None:
    harness = consumer_harness(CrashAfterScoring)

    delivery = await harness.deliver(lead("e-1"))

    assert [str(error) for error in delivery.errors] == ["injected failure after the scoring call"]
    assert delivery.applied == 1
    assert scoring_service.calls_total == 1
    assert len(await harness.state.step_results()) == 1
    # The rolled-back attempt's outbox row is gone with it.
    assert len(await harness.state.outbox()) == 1
    await harness.assert_applied_once("e-1", effects=COUNT_SCORES)


async def test_downstream_counts_each_published_event_once(
    consumer_harness: HarnessFactory, scoring_service: Any
) -> None:
    scorer = consumer_harness(leads.LeadScorer)
    counter = consumer_harness(downstream.ScoredLeadCounter)
    await scorer.deliver(lead("e-1"), lead("e-2", lead_id="lead-2"))
    published = [
        counter.message(
            bytes(row["value"]),
            key=bytes(row["key"]),
            headers=list(zip(row["header_names"], map(bytes, row["header_values"]), strict=True)),
        )
        for row in await scorer.state.outbox()
    ]

    # The relay sends at least once: every row arrives twice.
    delivery = await counter.deliver(*published, *[counter.copy_of(message) for message in published])

    assert delivery.applied == 2
    assert delivery.key_duplicates == 2
    for message in published:
        await counter.assert_applied_once(message, effects=COUNT_SCORED_EVENTS)
