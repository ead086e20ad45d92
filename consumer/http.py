"""Send a handler's derived idempotency keys with httpx.

A remote API that deduplicates on an ``Idempotency-Key`` header applies a
call once when every retry, redelivery and replay of the message sends the
same key, which ``context.idempotency_key(name)`` returns::

    from consumer import http

    async with httpx.AsyncClient() as client:
        response = await client.post(url, json=body, headers=http.idempotency_headers(context, "charge"))

or, on a client without authentication of its own,
``client.post(url, json=body, auth=http.IdempotencyKeyAuth.for_call(context, "charge"))``.

Use one name per remote effect in a handler run: unlike ``context.step``,
the key of a name is not numbered, so two calls under one name send the same
key and the remote side applies only the first.

This module needs httpx, from the ``httpx`` extra: ``pip install 'consumer[httpx]'``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from consumer.handler import IDEMPOTENCY_KEY_HEADER, Context
from consumer.message import Message

try:
    import httpx
except ImportError as exc:
    raise ImportError(
        "consumer.http needs httpx, which is not installed; install the extra: pip install 'consumer[httpx]'",
        name="httpx",
    ) from exc

__all__ = ["IDEMPOTENCY_KEY_HEADER", "IdempotencyKeyAuth", "idempotency_headers"]


def idempotency_headers(
    context: Context,
    name: str,
    *,
    message: Message[Any] | None = None,
    header: str = IDEMPOTENCY_KEY_HEADER,
) -> dict[str, str]:
    """Return ``{header: context.idempotency_key(name)}`` to merge into a request's headers.

    In a batch handler, pass the message the call belongs to as `message`.
    """
    return {header: context.idempotency_key(name, message)}


class IdempotencyKeyAuth(httpx.Auth):
    """Sets one idempotency key header on every request it is used for, with sync and async clients.

    Build one per remote effect, usually with `for_call`. httpx uses a
    request's `auth` instead of the client's, so on a client that
    authenticates (a bearer token, basic auth) pass `idempotency_headers` as
    ``headers=`` instead.
    """

    def __init__(self, key: str, *, header: str = IDEMPOTENCY_KEY_HEADER) -> None:
        if not key:
            raise ValueError("idempotency key is empty; derive it with context.idempotency_key(name)")
        self.key = key
        self.header = header

    @classmethod
    def for_call(
        cls,
        context: Context,
        name: str,
        *,
        message: Message[Any] | None = None,
        header: str = IDEMPOTENCY_KEY_HEADER,
    ) -> IdempotencyKeyAuth:
        """Build the auth for the remote effect `name` of the message being handled."""
        return cls(context.idempotency_key(name, message), header=header)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self.header] = self.key
        yield request
