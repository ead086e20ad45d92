"""The handler the chaos workers run: one effect row per message, with faults chosen by the driver.

The driver writes a JSON hook file before it starts any worker and names it
in ``CONSUMER_CHAOS_HOOKS_FILE``. Its keys are idempotency keys:

- ``transient``: raise `RuntimeError` on the first call of the key in any
  worker, so the framework retries it and applies it on a later attempt;
- ``permanent``: raise `PermanentError` on every call, so the message is
  dead-lettered;
- ``sleep_before_s`` and ``sleep_after_s``: maps of key to seconds to sleep
  before writing the effect, or after it with the transaction still open,
  so that kills and lost connections land inside handlers.

Calls are counted in ``chaos_app.invocations`` over a separate autocommit
connection, whose ``application_name`` ends in ``-side`` so that the
driver's connection kills leave it alone. ``CONSUMER_CHAOS_WORKER`` names
the worker slot in effect rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from consumer import Context, Handler, Message, PermanentError

__all__ = ["HOOKS_FILE_VAR", "WORKER_VAR", "ChaosHandler", "Hooks"]

HOOKS_FILE_VAR = "CONSUMER_CHAOS_HOOKS_FILE"
WORKER_VAR = "CONSUMER_CHAOS_WORKER"

MIGRATIONS = Path(__file__).parent / "migrations"

_INSERT_EFFECT = """
INSERT INTO chaos_app.effects (idem_key, topic, partition, "offset", worker, backend_pid, xid)
VALUES ($1, $2, $3, $4, $5, pg_backend_pid(), txid_current())
"""

# Two calls of one key never run at the same time (the second waits on the
# first one's dedup claim), so counting and inserting in one statement is enough.
_RECORD_CALL = """
INSERT INTO chaos_app.invocations (idem_key, call_number, worker)
SELECT $1, count(*) + 1, $2 FROM chaos_app.invocations WHERE idem_key = $1
RETURNING call_number
"""


@dataclass(frozen=True)
class Hooks:
    """Faults of chosen keys, as the driver writes them to the hook file."""

    transient: frozenset[str] = frozenset()
    permanent: frozenset[str] = frozenset()
    sleep_before_s: dict[str, float] = field(default_factory=dict)
    sleep_after_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "transient": sorted(self.transient),
                "permanent": sorted(self.permanent),
                "sleep_before_s": self.sleep_before_s,
                "sleep_after_s": self.sleep_after_s,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Hooks:
        data = json.loads(text)
        return cls(
            transient=frozenset(data.get("transient", [])),
            permanent=frozenset(data.get("permanent", [])),
            sleep_before_s={key: float(value) for key, value in data.get("sleep_before_s", {}).items()},
            sleep_after_s={key: float(value) for key, value in data.get("sleep_after_s", {}).items()},
        )


class _Process:
    """State shared by every call in one worker process: the hooks and the counting connection."""

    hooks: Hooks | None = None
    side: asyncpg.Connection | None = None

    @classmethod
    def load_hooks(cls) -> Hooks:
        # The driver never changes the file after the first worker starts, so it is read once.
        if cls.hooks is None:
            path = os.environ.get(HOOKS_FILE_VAR)
            cls.hooks = Hooks.from_json(Path(path).read_text()) if path else Hooks()
        return cls.hooks

    @classmethod
    async def side_connection(cls) -> asyncpg.Connection:
        if cls.side is None or cls.side.is_closed():
            cls.side = await asyncpg.connect(
                os.environ["CONSUMER_POSTGRES__DSN"], server_settings={"application_name": f"{worker_name()}-side"}
            )
        return cls.side


def worker_name() -> str:
    """Return the worker slot given by the driver, or the process id outside the driver."""
    return os.environ.get(WORKER_VAR, f"pid-{os.getpid()}")


async def record_call(key: str) -> int:
    """Count this call of `key` and return its number, 1 for the first call in any worker."""
    side = await _Process.side_connection()
    number: int = await side.fetchval(_RECORD_CALL, key, f"{worker_name()}/pid-{os.getpid()}")
    return number


class ChaosHandler(Handler[dict[str, Any]]):
    """Writes one effect row per message; the topic and group come from the driver's settings."""

    topics = ("chaos",)
    group_id = "chaos"
    migrations = MIGRATIONS

    async def handle(self, message: Message[dict[str, Any]], context: Context) -> None:
        key = message.idempotency_key
        hooks = _Process.load_hooks()
        call_number = await record_call(key)

        if key in hooks.sleep_before_s:
            await anyio.sleep(hooks.sleep_before_s[key])
        if key in hooks.permanent:
            raise PermanentError(f"chaos: {key} always fails")
        if key in hooks.transient and call_number == 1:
            raise RuntimeError(f"chaos: {key} fails on its first call")

        await context.connection.execute(
            _INSERT_EFFECT,
            key,
            message.topic,
            message.partition,
            message.offset,
            f"{worker_name()}/pid-{os.getpid()}",
        )
        if key in hooks.sleep_after_s:
            await anyio.sleep(hooks.sleep_after_s[key])
