"""Statements a handler defers with `Context.defer`, sent together once the batch's handler calls are done.

A per-message handler that runs ``await connection.execute(...)`` pays one
round trip to PostgreSQL per message. Deferred statements are kept in the
order they were deferred and sent when the calls they belong to have
returned: each run of the same statement text goes out as one
``executemany``. A handler that defers one INSERT per message therefore
costs one round trip per batch, as a `BatchHandler` does.

Invariants:

- Statements run in exactly the order they were deferred. Only neighbours
  with the same text are merged, so a statement never overtakes another.
- They run inside the batch transaction, before the position advances: they
  commit or roll back with the dedup records, like any other effect.
- When the batch is redone one message at a time (after a failure), each
  message's statements are sent at the end of its own savepoint, so a
  statement that fails is charged to the message that deferred it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

__all__ = ["DeferredWrites"]


class DeferredWrites:
    """Statements deferred by the handler calls of one transaction or savepoint."""

    __slots__ = ("_statements",)

    def __init__(self) -> None:
        self._statements: list[tuple[str, Sequence[Any]]] = []

    def __len__(self) -> int:
        return len(self._statements)

    def add(self, query: str, args: Sequence[Any]) -> None:
        self._statements.append((query, args))

    async def flush(self, connection: asyncpg.Connection) -> None:
        """Send every deferred statement, one ``executemany`` per run of equal text, and forget them."""
        statements, self._statements = self._statements, []
        start = 0
        while start < len(statements):
            query = statements[start][0]
            end = start + 1
            while end < len(statements) and statements[end][0] == query:
                end += 1
            if end - start == 1:
                await connection.execute(query, *statements[start][1])
            else:
                await connection.executemany(query, [args for _, args in statements[start:end]])
            start = end
