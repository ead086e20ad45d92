"""A stand-in for a remote lead-scoring API that deduplicates on the ``Idempotency-Key`` header.

``POST /score`` takes a lead as JSON and returns ``{"lead_id", "score",
"model", "request_id"}``. The score has a random part, like a model scoring
with fresh features on every call, so a score computed twice differs: a
caller that calls twice for one lead without a key stores a different score
than a retry would.

Like a well-behaved payment or CRM API, the service stores its response per
``Idempotency-Key`` and returns the stored response to a request with a key it
has seen, even when the first request's client disconnected before reading
it. Two requests with the same key never run at once: the second waits for
the first. Every request is counted, per key and in total, and ``GET
/stats`` returns the counts, so a test or a person can see how often the
worker called.

Run it on its own with ``python -m examples.leads.scoring_service``; it
listens on 127.0.0.1 at a free port and prints its URL.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["ScoringService", "main"]

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
MODEL_VERSION = "lead-score-2"

_MAX_HEAD_BYTES = 16 * 1024
_MAX_BODY_BYTES = 1024 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 422: "Unprocessable Entity"}


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class _Response:
    status: int
    body: dict[str, Any]


class _BadRequest(Exception):
    """The request cannot be parsed, so the service responds with 400 and closes the connection."""


@dataclass
class ScoringService:
    """The service's state: stored responses by key, call counts, and the delay of each call.

    `delay_s` makes every call slow, so a test can stop the caller while a
    call is in flight. With `deduplicate` off the service computes a new
    response for every request, like an API that ignores the header.
    """

    delay_s: float = 0.0
    deduplicate: bool = True
    calls_total: int = 0
    calls_without_key: int = 0
    calls_by_key: Counter[str] = field(default_factory=Counter)
    # Every response sent for a key, in order: equal entries mean the key was deduplicated.
    responses_by_key: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    port: int | None = None
    _stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    _key_locks: dict[str, anyio.Lock] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Base URL of the running service, for LEAD_SCORER_URL."""
        if self.port is None:
            raise RuntimeError("the scoring service is not listening yet; await serve() in a task first")
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, port: int = 0, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1:`port` (0 picks a free port) until cancelled; report the port to `task_status`."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        # S610 matches Django's QuerySet.extra by name; this is anyio's typed attribute lookup.
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._serve_connection)

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        """Serve requests on one connection until the client closes it (HTTP/1.1 keep-alive)."""
        async with stream:
            receiver = BufferedByteReceiveStream(stream)
            while True:
                try:
                    request = await _read_request(receiver)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, ConnectionError):
                    return
                except _BadRequest as exc:
                    await _send(stream, _Response(400, {"error": str(exc)}), close=True)
                    return
                response = await self._route(request)
                try:
                    await _send(stream, response, close=False)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                    # The client went away during the call. Its response is stored anyway.
                    return

    async def _route(self, request: _Request) -> _Response:
        routes: dict[tuple[str, str], Callable[[_Request], Awaitable[_Response]]] = {
            ("POST", "/score"): self._score,
            ("GET", "/stats"): self._stats,
        }
        handler = routes.get((request.method, request.path))
        if handler is not None:
            return await handler(request)
        if request.path in {path for _, path in routes}:
            return _Response(405, {"error": f"{request.method} is not allowed on {request.path}"})
        return _Response(404, {"error": f"no route {request.path}; use POST /score or GET /stats"})

    async def _score(self, request: _Request) -> _Response:
        self.calls_total += 1
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
        if key is None:
            self.calls_without_key += 1
            return await self._compute(request)
        self.calls_by_key[key] += 1

        lock = self._key_locks.setdefault(key, anyio.Lock())
        async with lock:
            stored = self._stored.get(key) if self.deduplicate else None
            if stored is not None:
                response = _Response(200, stored)
            else:
                response = await self._compute(request)
                if response.status == 200:
                    self._stored[key] = response.body
        if response.status == 200:
            self.responses_by_key.setdefault(key, []).append(response.body)
        return response

    async def _compute(self, request: _Request) -> _Response:
        try:
            lead = json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _Response(400, {"error": f"body is not JSON: {exc}"})
        if not isinstance(lead, dict) or not isinstance(lead.get("lead_id"), str) or not lead["lead_id"]:
            return _Response(422, {"error": "body must be a JSON object with a non-empty string lead_id"})
        if self.delay_s:
            # Nothing reads the socket meanwhile, so a client that disconnects
            # does not cut the computation short: its response is still stored.
            await anyio.sleep(self.delay_s)
        return _Response(
            200,
            {
                "lead_id": lead["lead_id"],
                "score": _compute_score(lead),
                "model": MODEL_VERSION,
                "request_id": uuid.uuid4().hex,
            },
        )

    async def _stats(self, request: _Request) -> _Response:
        return _Response(
            200,
            {
                "calls_total": self.calls_total,
                "calls_without_key": self.calls_without_key,
                "calls_by_key": dict(self.calls_by_key),
            },
        )


def _compute_score(lead: dict[str, Any]) -> float:
    """Return a score from 0 to 100: a fixed part from the lead's firmographics plus random noise."""
    employees = lead.get("employees")
    size_points = min(int(employees), 5000) / 100 if isinstance(employees, int) and employees > 0 else 0.0
    business_email = 0.0 if str(lead.get("email", "")).endswith(("@gmail.com", "@yahoo.com")) else 20.0
    noise = random.uniform(0.0, 30.0)
    return round(min(size_points + business_email + noise, 100.0), 3)


async def _read_request(receiver: BufferedByteReceiveStream) -> _Request:
    try:
        head = await receiver.receive_until(b"\r\n\r\n", _MAX_HEAD_BYTES)
    except anyio.DelimiterNotFound:
        raise _BadRequest(f"request head is longer than {_MAX_HEAD_BYTES} bytes") from None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = request_line.split(" ")
    except ValueError:
        raise _BadRequest(f"request line {request_line!r} is not METHOD PATH VERSION") from None
    headers: dict[str, str] = {}
    for line in header_lines:
        name, separator, value = line.partition(":")
        if not separator:
            raise _BadRequest(f"header line {line!r} has no colon")
        headers[name.strip().lower()] = value.strip()
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or int(length_text) > _MAX_BODY_BYTES:
        raise _BadRequest(f"content-length {length_text!r} is not a number up to {_MAX_BODY_BYTES}")
    body = await receiver.receive_exactly(int(length_text)) if int(length_text) else b""
    return _Request(method=method, path=target.split("?", 1)[0], headers=headers, body=body)


async def _send(stream: anyio.abc.SocketStream, response: _Response, *, close: bool) -> None:
    body = json.dumps(response.body).encode("utf-8")
    head = (
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    await stream.send(head.encode("latin-1") + body)


def main(argv: list[str] | None = None) -> None:
    """Run the service until interrupted."""
    parser = argparse.ArgumentParser(description="A lead-scoring API that deduplicates on Idempotency-Key.")
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (default: a free port).")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="Time each score takes.")
    parser.add_argument(
        "--no-dedup", action="store_true", help="Compute a new response for every request, ignoring Idempotency-Key."
    )
    args = parser.parse_args(argv)
    service = ScoringService(delay_s=args.delay, deduplicate=not args.no_dedup)

    async def run() -> None:
        async with anyio.create_task_group() as task_group:
            await task_group.start(functools.partial(service.serve, port=args.port))
            print(f"scoring service listening on {service.url}", flush=True)

    try:
        anyio.run(run, backend="asyncio")
    except KeyboardInterrupt:
        print(f"stopped after {service.calls_total} call(s)", flush=True)


if __name__ == "__main__":
    main()
