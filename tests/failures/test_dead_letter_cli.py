"""``consumer dead-letters list | show | redrive | purge`` on dead letters left by a real worker run.

Each test runs `FaultyOrderHandler` in-process over a topic with poison
messages, then runs the CLI as a subprocess and checks its exit code, its
output and the rows it changed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pytest

from tests.failures import handlers as failure_handlers
from tests.failures.helpers import FailureRows, handler_path, record, run_cli
from tests.integration import helpers
from tests.support import kafka

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

RELAXED = handler_path(failure_handlers.RelaxedOrderHandler)

TRACE_HEADERS: list[tuple[str, bytes | None]] = [("trace", b"\xfe\x00\xff"), ("trace", b"again"), ("empty", None)]
INVALID_JSON = b'{"order_id": "k-1", "amount": '
NOT_UTF8 = b"\xff\xfe\x00order-3"

# Offset: (idempotency key, reason, attempts, last error type) of each dead letter the run leaves.
EXPECTED = {
    1: ("k-1", "decode", 1, "DecodeError"),
    2: ("k-2", "validation", 1, "DecodeError"),
    3: ("k-3", "decode", 1, "DecodeError"),
    4: ("k-4", "handler_error", 3, "RuntimeError"),
    6: ("k-6", "validation", 1, "DecodeError"),
}
ALL_KEYS = [f"k-{index}" for index in range(8)]


@dataclass(frozen=True)
class PoisonRun:
    """What `run_with_poison` left behind."""

    topic: str
    # Dead letter id by offset.
    ids: dict[int, int]
    # Server time between the two rounds of messages.
    between_rounds: datetime


async def run_with_poison(kafka_bootstrap: str, topic: str, database_url: str, rows: FailureRows) -> PoisonRun:
    """Run the worker over good and poison messages in two rounds, and wait until all are handled."""
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, database_url, topic, group_id)
    first_round = [
        record("k-0"),
        record("k-1", value=INVALID_JSON),
        record("k-2", value=b'{"order_id": "k-2"}', headers=TRACE_HEADERS),
        record("k-3", value=NOT_UTF8),
        record("k-4", fault="RuntimeError"),
        record("k-5"),
    ]
    second_round = [record("k-6", value=b'{"order_id": "k-6", "amount": "lots"}'), record("k-7")]

    await kafka.produce(kafka_bootstrap, topic, first_round)
    async with helpers.running_worker(failure_handlers.FaultyOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 6})
        between_rounds = await rows.clock()
        await kafka.produce(kafka_bootstrap, topic, second_round)
        await rows.wait_for_next_offsets(group_id, topic, {0: 8})
    ids = await rows.letter_ids(topic)
    assert sorted(ids) == sorted(EXPECTED), ids
    return PoisonRun(topic=topic, ids=ids, between_rounds=between_rounds)


async def list_offsets(database_url: str, *filters: str) -> list[int]:
    """Run ``list --json`` with `filters` and return the offsets listed, in output order."""
    listed = await run_cli(database_url, "dead-letters", "list", "--json", *filters)
    assert listed.exit_code == 0, listed
    return [letter["offset"] for letter in listed.json()]


async def test_list_filters_and_show_bytes(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    run = await run_with_poison(kafka_bootstrap, topic_factory(), app_database, rows)
    topic = run.topic

    table = await run_cli(app_database, "dead-letters", "list")
    listed = await run_cli(app_database, "dead-letters", "list", "--json")

    assert table.exit_code == 0, table
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "REASON", "POSITION", "ATT", "ERROR"]
    assert [line.split()[:5] for line in lines[1:]] == [
        [str(run.ids[offset]), "dead", reason, f"{topic}-0@{offset}", str(attempts)]
        for offset, (_, reason, attempts, _) in EXPECTED.items()
    ]
    assert "RuntimeError: injected RuntimeError for k-4" in lines[4]
    assert listed.exit_code == 0, listed
    assert [
        (letter["id"], letter["offset"], letter["idempotency_key"], letter["reason"], letter["attempts"])
        for letter in listed.json()
    ] == [
        # A value that fails to decode never reaches the handler's key function, so no idempotency key is stored.
        (run.ids[offset], offset, key if reason == "handler_error" else None, reason, attempts)
        for offset, (key, reason, attempts, _) in EXPECTED.items()
    ]
    assert {letter["status"] for letter in listed.json()} == {"dead"}
    assert {letter["handler"] for letter in listed.json()} == {failure_handlers.FaultyOrderHandler.name()}
    assert [letter["last_error_type"] for letter in listed.json()] == [error for *_, error in EXPECTED.values()]

    assert await list_offsets(app_database, "--topic", topic) == list(EXPECTED)
    assert await list_offsets(app_database, "--topic", "some-other-topic") == []
    assert await list_offsets(app_database, "--reason", "validation") == [2, 6]
    assert await list_offsets(app_database, "--reason", "decode") == [1, 3]
    assert await list_offsets(app_database, "--error-type", "RuntimeError") == [4]
    assert await list_offsets(app_database, "--key", "k-4") == [4]
    # Without a stored idempotency key, --key matches the Kafka key as UTF-8.
    assert await list_offsets(app_database, "--key", "k-1") == [1]
    assert await list_offsets(app_database, "--status", "dead") == list(EXPECTED)
    assert await list_offsets(app_database, "--status", "resolved") == []
    assert await list_offsets(app_database, "--since", run.between_rounds.isoformat()) == [6]
    assert await list_offsets(app_database, "--until", run.between_rounds.isoformat()) == [1, 2, 3, 4]
    assert await list_offsets(app_database, "--reason", "validation", "--since", run.between_rounds.isoformat()) == [6]

    # Text form: the value as UTF-8, headers in order with repeats and nulls, the traceback.
    shown_text = await run_cli(app_database, "dead-letters", "show", str(run.ids[1]))
    shown_headers = await run_cli(app_database, "dead-letters", "show", str(run.ids[2]))
    shown_failure = await run_cli(app_database, "dead-letters", "show", str(run.ids[4]))
    assert shown_text.exit_code == 0, shown_text
    assert f"{'value':<18} {INVALID_JSON.decode()}" in shown_text.stdout.splitlines()
    assert "value is not valid JSON" in shown_text.stdout
    assert shown_headers.exit_code == 0, shown_headers
    header_lines = shown_headers.stdout.split("\nheaders\n")[1].split("\ntraceback\n")[0].splitlines()
    assert header_lines == ["  Idempotency-Key: k-2", "  trace: base64:/gD/", "  trace: again", "  empty: None"]
    assert shown_failure.exit_code == 0, shown_failure
    traceback = shown_failure.stdout.split("\ntraceback\n")[1]
    assert "Traceback (most recent call last)" in traceback
    assert "RuntimeError: injected RuntimeError for k-4" in traceback

    # JSON form: a value that is not UTF-8 comes out as base64, byte for byte.
    shown_bytes = await run_cli(app_database, "dead-letters", "show", str(run.ids[3]), "--json")
    shown_headers_json = await run_cli(app_database, "dead-letters", "show", str(run.ids[2]), "--json")
    assert shown_bytes.exit_code == 0, shown_bytes
    assert shown_bytes.json()["value"] == "base64:" + base64.b64encode(NOT_UTF8).decode()
    assert shown_bytes.json()["key"] == "k-3"
    assert shown_bytes.json()["offset"] == 3
    assert shown_headers_json.json()["headers"] == [
        {"name": "Idempotency-Key", "value": "k-2"},
        {"name": "trace", "value": "base64:" + base64.b64encode(b"\xfe\x00\xff").decode()},
        {"name": "trace", "value": "again"},
        {"name": "empty", "value": None},
    ]
    assert json.loads(b'{"order_id": "k-2"}') == json.loads(shown_headers_json.json()["value"])

    missing = await run_cli(app_database, "dead-letters", "show", "999999")
    assert missing.exit_code == 1, missing
    assert "dead letter 999999 not found" in missing.stderr


async def test_redrive_after_fix_applies_once(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    run = await run_with_poison(kafka_bootstrap, topic_factory(), app_database, rows)

    # Without the fix the handler fails again: nothing changes but the redrive count.
    unfixed = await run_cli(app_database, "dead-letters", "redrive", "--id", str(run.ids[4]))
    still_dead = (await rows.letters_by_offset(run.topic))[4]
    assert unfixed.exit_code == 1, unfixed
    assert "failed again 1" in unfixed.stdout
    assert f"{run.ids[4]}: RuntimeError: injected RuntimeError for k-4" in unfixed.stdout
    assert still_dead["status"] == "dead"
    assert still_dead["redrive_attempts"] == 1
    assert "k-4" not in await rows.effect_keys()

    # The relaxed model accepts the undecodable values, and the fix variable cures k-4.
    fixed = await run_cli(app_database, "dead-letters", "redrive", "--handler", RELAXED, "--json", fixed=True)
    letters = await rows.letters_by_offset(run.topic)
    effects = {effect["idem_key"]: effect for effect in await rows.effects()}

    assert fixed.exit_code == 0, fixed
    assert fixed.json()["selected"] == 5
    assert sorted(fixed.json()["resolved"]) == sorted(run.ids.values())
    assert fixed.json()["failed"] == {}
    assert await rows.effects_per_key() == dict.fromkeys(ALL_KEYS, 1)
    for offset, (key, *_) in EXPECTED.items():
        assert letters[offset]["status"] == "resolved", key
        assert letters[offset]["resolved_at"] is not None, key
        assert effects[key]["offset"] == offset, key
        # RelaxedOrderHandler takes raw bytes, so it writes no order fields.
        assert effects[key]["order_id"] is None, key
    assert letters[4]["redrive_attempts"] == 2

    # A second redrive, by default or of resolved letters, applies nothing.
    again = await run_cli(app_database, "dead-letters", "redrive", "--handler", RELAXED, "--json", fixed=True)
    resolved_again = await run_cli(
        app_database, "dead-letters", "redrive", "--status", "resolved", "--handler", RELAXED, "--json", fixed=True
    )
    assert again.exit_code == 0, again
    assert again.json()["selected"] == 0
    assert resolved_again.exit_code == 0, resolved_again
    assert resolved_again.json()["resolved"] == []
    assert sorted(resolved_again.json()["skipped"]) == sorted(run.ids.values())
    assert await rows.effects_per_key() == dict.fromkeys(ALL_KEYS, 1)


async def test_purge_needs_filter_and_confirmation(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    run = await run_with_poison(kafka_bootstrap, topic_factory(), app_database, rows)

    unfiltered = await run_cli(app_database, "dead-letters", "purge", "--yes")
    unconfirmed = await run_cli(app_database, "dead-letters", "purge", "--reason", "validation")
    assert unfiltered.exit_code == 2, unfiltered
    assert "purge needs a filter" in unfiltered.stderr
    assert unconfirmed.exit_code == 2, unconfirmed
    assert "pass --yes" in unconfirmed.stderr
    assert sorted(await rows.letter_ids(run.topic)) == sorted(EXPECTED)

    redriven = await run_cli(app_database, "dead-letters", "redrive", "--reason", "validation", "--handler", RELAXED)
    purged = await run_cli(app_database, "dead-letters", "purge", "--status", "resolved", "--yes")
    purged_again = await run_cli(app_database, "dead-letters", "purge", "--status", "resolved", "--yes")
    left = await rows.letters_by_offset(run.topic)

    assert redriven.exit_code == 0, redriven
    assert purged.exit_code == 0, purged
    assert purged.stdout.strip() == "deleted 2 dead letters (2 resolved)"
    assert purged_again.exit_code == 0, purged_again
    assert purged_again.stdout.strip() == "no dead letters match"
    assert sorted(left) == [1, 3, 4]
    assert {letter["status"] for letter in left.values()} == {"dead"}
    # Purging a resolved dead letter keeps the effect its redrive applied.
    assert await rows.effects_per_key() == dict.fromkeys(["k-0", "k-2", "k-5", "k-6", "k-7"], 1)


async def test_republished_copy_skipped_until_redrive(
    kafka_bootstrap: str, topic_factory: Callable[..., str], app_database: str, rows: FailureRows
) -> None:
    topic = topic_factory()
    group_id = helpers.unique_group()
    config = helpers.worker_settings(kafka_bootstrap, app_database, topic, group_id)
    await kafka.produce(kafka_bootstrap, topic, [record("k-0", fault="RuntimeError"), record("k-1", value=b"not json")])

    async with helpers.running_worker(failure_handlers.FaultyOrderHandler(), config):
        await rows.wait_for_next_offsets(group_id, topic, {0: 2})
        # The same value again without the fault header, and k-1 corrected.
        await kafka.produce(kafka_bootstrap, topic, [record("k-0"), record("k-1")])
        await rows.wait_for_next_offsets(group_id, topic, {0: 4})
    position = (await rows.positions(group_id, topic))[0]

    # k-0 reached the handler, so its key stays claimed and the copy is a
    # duplicate; k-1 failed to decode before it claimed its key.
    assert await rows.effect_keys() == ["k-1"]
    assert sorted(await rows.letter_ids(topic)) == [0, 1]
    assert position["key_duplicates"] == 1
    assert await rows.invocations("k-0") == 3

    redriven = await run_cli(app_database, "dead-letters", "redrive", "--key", "k-0", "--json", fixed=True)
    assert redriven.exit_code == 0, redriven
    assert redriven.json()["resolved"] == [(await rows.letter_ids(topic))[0]]
    assert await rows.effects_per_key() == {"k-0": 1, "k-1": 1}
