"""Unit tests of consumer.logs: the JSON and text formats and the repeat filter."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from consumer import logs

pytestmark = pytest.mark.unit


class Clock:
    """A settable stand-in for time.monotonic, in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger of its own whose records go, formatted, to a StringIO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(f"tests.unit.logs.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream, handler
    logger.removeHandler(handler)


def record(message: str = "batch committed", name: str = "consumer.processor") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)


def test_json_formatter_puts_extra_fields_at_top_level(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.JsonFormatter())

    logger.warning(
        "handler failed on attempt %d of %d",
        2,
        3,
        extra={"action": "message_retry_scheduled", "topic": "orders", "partition": 4, "offset": 17, "attempt": 2},
    )
    line = stream.getvalue()
    data = json.loads(line)

    assert line.count("\n") == 1
    assert data["message"] == "handler failed on attempt 2 of 3"
    assert data["level"] == "WARNING"
    assert data["logger"] == logger.name
    assert data["action"] == "message_retry_scheduled"
    assert data["topic"] == "orders"
    assert data["partition"] == 4
    assert data["offset"] == 17
    assert data["attempt"] == 2
    assert data["time"].endswith("Z")
    assert "exception" not in data


def test_json_formatter_includes_exception(captured: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.JsonFormatter())

    def fail() -> None:
        raise ValueError("no stock")

    try:
        fail()
    except ValueError:
        logger.exception("dead-lettered", extra={"action": "message_dead_lettered"})
    data = json.loads(stream.getvalue())

    assert "ValueError: no stock" in data["exception"]
    assert data["action"] == "message_dead_lettered"


def test_json_formatter_serialises_other_types(captured: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.JsonFormatter())

    logger.info("raw key", extra={"key": b"\xff\x00"})

    assert json.loads(stream.getvalue())["key"] == str(b"\xff\x00")


def test_text_formatter_appends_extra_fields(captured: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.TextFormatter())

    logger.info("partitions assigned: %s", "orders-0", extra={"action": "partitions_assigned", "group_id": "g1"})
    line = stream.getvalue().rstrip("\n")

    assert line.endswith("partitions assigned: orders-0 [action=partitions_assigned group_id=g1]")
    assert " INFO " in line


def test_repeat_filter_suppresses_after_burst(clock: Clock) -> None:
    repeat_filter = logs.RepeatFilter(burst=3, window_s=60.0)

    passed = [repeat_filter.filter(record()) for _ in range(5)]

    assert passed == [True, True, True, False, False]


def test_repeat_filter_reports_suppressed_count_in_next_window(clock: Clock) -> None:
    repeat_filter = logs.RepeatFilter(burst=3, window_s=60.0)
    for _ in range(7):
        repeat_filter.filter(record())

    clock.now += 30.0
    inside_window = record()
    still_suppressed = repeat_filter.filter(inside_window)
    clock.now += 31.0
    next_window = record()
    allowed = repeat_filter.filter(next_window)
    after_report = record()
    repeat_filter.filter(after_report)

    assert not still_suppressed
    assert not hasattr(inside_window, "suppressed_repeats")
    assert allowed
    assert next_window.suppressed_repeats == 5  # type: ignore[attr-defined]
    assert not hasattr(after_report, "suppressed_repeats")


def test_repeat_filter_counts_templates_apart(clock: Clock) -> None:
    repeat_filter = logs.RepeatFilter(burst=1, window_s=60.0)

    first = repeat_filter.filter(record("batch failed %d"))
    repeated = repeat_filter.filter(record("batch failed %d"))
    other_message = repeat_filter.filter(record("worker started"))
    other_logger = repeat_filter.filter(record("batch failed %d", name="consumer.worker"))

    assert (first, repeated, other_message, other_logger) == (True, False, True, True)


def test_repeat_filter_count_shown_in_json(
    clock: Clock, captured: tuple[logging.Logger, io.StringIO, logging.Handler]
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RepeatFilter(burst=2, window_s=10.0))

    for index in range(4):
        logger.warning("retrying %d", index)
    clock.now += 11.0
    logger.warning("retrying %d", 4)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]

    assert [line["message"] for line in lines] == ["retrying 0", "retrying 1", "retrying 4"]
    assert lines[-1]["suppressed_repeats"] == 2
