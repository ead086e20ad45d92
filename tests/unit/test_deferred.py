"""How deferred statements are grouped into round trips, and what `Context.defer` rejects."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from consumer import errors
from consumer.deferred import DeferredWrites
from consumer.handler import Context

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


class RecordingConnection:
    """Records the calls `DeferredWrites.flush` makes, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    async def execute(self, query: str, *args: Any) -> None:
        self.calls.append(("execute", query, args))

    async def executemany(self, query: str, args: list[Any]) -> None:
        self.calls.append(("executemany", query, args))


async def test_equal_neighbours_share_executemany() -> None:
    deferred = DeferredWrites()
    for index in range(3):
        deferred.add("INSERT a", (index,))
    deferred.add("INSERT b", ("x",))
    deferred.add("INSERT a", (9,))
    connection = RecordingConnection()

    await deferred.flush(connection)  # type: ignore[arg-type]

    assert connection.calls == [
        ("executemany", "INSERT a", [(0,), (1,), (2,)]),
        ("execute", "INSERT b", ("x",)),
        ("execute", "INSERT a", (9,)),
    ]
    assert len(deferred) == 0


async def test_interleaved_statements_keep_order() -> None:
    # Two statements per message, alternating: merging equal texts across
    # the other one would run a child row before its parent.
    deferred = DeferredWrites()
    for message in range(2):
        deferred.add("INSERT parent", (message,))
        deferred.add("INSERT child", (message,))
    connection = RecordingConnection()

    await deferred.flush(connection)  # type: ignore[arg-type]

    assert [(query, args) for _, query, args in connection.calls] == [
        ("INSERT parent", (0,)),
        ("INSERT child", (0,)),
        ("INSERT parent", (1,)),
        ("INSERT child", (1,)),
    ]


async def test_flush_forgets_after_failure() -> None:
    class FailingConnection(RecordingConnection):
        async def execute(self, query: str, *args: Any) -> None:
            raise RuntimeError("boom")

    deferred = DeferredWrites()
    deferred.add("INSERT a", (1,))

    with pytest.raises(RuntimeError):
        await deferred.flush(FailingConnection())  # type: ignore[arg-type]
    # The transaction they belonged to is rolled back; they must not be sent again.
    assert len(deferred) == 0


def test_defer_outside_transaction_rejected() -> None:
    context = Context(
        connection=None,  # type: ignore[arg-type]
        group_id="g",
        dedup_scope="g",
        attempt=1,
        logger=logging.getLogger(__name__),
    )

    with pytest.raises(errors.ConsumerError, match="defer needs the batch transaction"):
        context.defer("INSERT INTO t VALUES ($1)", 1)
