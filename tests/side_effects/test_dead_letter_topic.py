"""A handler's `dead_letter_topic`: dead letters are published there, through the outbox, byte for byte."""

from __future__ import annotations

import pytest

from tests.side_effects.helpers import LeadRows, LeadsDeployment, lead_record, wait_until
from tests.support import kafka

pytestmark = [pytest.mark.anyio, pytest.mark.acceptance]


async def test_dead_letters_published_with_original_bytes(leads: tuple[LeadsDeployment, LeadRows]) -> None:
    deployment, rows = leads
    service = deployment.service
    deployment.start_scorer(hooks={"e-2": {"fail_after_step": -1}}, worker__max_attempts=2)
    failing = lead_record("e-2")
    produced = [
        kafka.Record(key=b"lead-bad", value=b"{not json", headers=[("trace-id", b"t-0")]),
        kafka.Record(key=failing.key, value=failing.value, headers=[("trace-id", b"t-1")]),
        lead_record("e-3"),
    ]

    await deployment.produce(produced)
    letters = await deployment.read_topic(deployment.dead_letter_topic, 2)

    assert [letter.key for letter in letters] == [b"lead-bad", failing.key]
    assert [letter.value for letter in letters] == [b"{not json", failing.value]
    decode, handler_error = (dict(letter.headers) for letter in letters)
    assert letters[0].headers[0] == ("trace-id", b"t-0"), "original headers come first"
    assert decode["trace-id"] == b"t-0"
    assert decode["x-dead-letter-reason"] == b"decode"
    assert decode["x-dead-letter-error"].startswith(b"DecodeError: ")
    assert decode["x-original-topic"] == deployment.leads_topic.encode()
    assert decode["x-original-partition"] == b"0"
    assert decode["x-original-offset"] == b"0"
    assert handler_error["trace-id"] == b"t-1"
    assert handler_error["x-dead-letter-reason"] == b"handler_error"
    assert handler_error["x-dead-letter-error"].startswith(b"RuntimeError: fault hook")
    assert handler_error["x-original-offset"] == b"1"

    scores = await wait_until(rows.lead_scores, description="the CRM row of lead-e-3")
    assert list(scores) == ["lead-e-3"]
    assert len(await rows.handler_calls("e-2")) == 2, "max_attempts is 2"
    assert service.calls_total == 2, "e-2's second attempt reuses its stored response; e-3 calls once"
    dead_letters = await rows.connection.fetch('SELECT "offset", reason FROM consumer.dead_letters ORDER BY "offset"')
    assert [(row["offset"], row["reason"]) for row in dead_letters] == [(0, "decode"), (1, "handler_error")]
