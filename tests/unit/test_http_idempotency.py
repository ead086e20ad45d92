"""Unit tests of consumer.http: the Idempotency-Key helpers on httpx clients, with httpx's mock transport."""

from __future__ import annotations

import importlib
import logging
import sys

import httpx
import pytest

from consumer import errors, http
from consumer.handler import Context
from consumer.message import RawMessage, decoded_as
from consumer.side_effects import SideEffects, derive_key

pytestmark = pytest.mark.unit

SCOPE = "lead-scorer"


def _context(*, batch: bool = False) -> Context:
    raw = RawMessage(topic="leads", partition=0, offset=7, key=b"lead-1", value=b"{}")
    side_effects = SideEffects(queries=None, dedup_scope=SCOPE, acquire_side_connection=lambda: None)
    return Context(
        connection=None,  # type: ignore[arg-type]
        group_id=SCOPE,
        dedup_scope=SCOPE,
        attempt=1,
        logger=logging.getLogger(__name__),
        message=None if batch else decoded_as(raw, {}, "e-1"),
        side_effects=side_effects,
    )


def _echo_headers(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=dict(request.headers))


def test_idempotency_headers_carry_derived_key() -> None:
    headers = http.idempotency_headers(_context(), "score")

    assert headers == {"Idempotency-Key": derive_key(SCOPE, "e-1", "score")}


def test_idempotency_headers_custom_header_name() -> None:
    headers = http.idempotency_headers(_context(), "score", header="X-Request-Id")

    assert headers == {"X-Request-Id": derive_key(SCOPE, "e-1", "score")}


def test_idempotency_headers_in_batch_need_message() -> None:
    context = _context(batch=True)
    message = decoded_as(RawMessage(topic="leads", partition=0, offset=3, key=None, value=b"{}"), {}, "e-9")

    with pytest.raises(errors.ConsumerError, match="pass message="):
        http.idempotency_headers(context, "score")
    assert http.idempotency_headers(context, "score", message=message) == {
        "Idempotency-Key": derive_key(SCOPE, "e-9", "score")
    }


def test_auth_sets_header_on_sync_client() -> None:
    auth = http.IdempotencyKeyAuth.for_call(_context(), "score")

    with httpx.Client(transport=httpx.MockTransport(_echo_headers)) as client:
        first = client.post("http://scoring.test/score", json={}, auth=auth).json()
        second = client.post("http://scoring.test/score", json={}, auth=auth).json()

    assert first["idempotency-key"] == derive_key(SCOPE, "e-1", "score")
    assert second["idempotency-key"] == first["idempotency-key"], "every request sent with one auth carries its key"


@pytest.mark.anyio
async def test_auth_sets_header_on_async_client() -> None:
    auth = http.IdempotencyKeyAuth(derive_key(SCOPE, "e-1", "score"), header="X-Idempotency-Key")

    async with httpx.AsyncClient(transport=httpx.MockTransport(_echo_headers)) as client:
        response = await client.post("http://scoring.test/score", json={}, auth=auth)

    assert response.json()["x-idempotency-key"] == derive_key(SCOPE, "e-1", "score")
    assert "idempotency-key" not in response.json()


def test_auth_rejects_empty_key() -> None:
    with pytest.raises(ValueError, match="idempotency key is empty"):
        http.IdempotencyKeyAuth("")


def test_import_without_httpx_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import httpx` raise ImportError.
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delitem(sys.modules, "consumer.http")

    with pytest.raises(ImportError, match=r"pip install 'consumer\[httpx\]'") as raised:
        importlib.import_module("consumer.http")
    assert raised.value.name == "httpx"
