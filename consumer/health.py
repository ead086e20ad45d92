"""The worker's HTTP endpoints: liveness, readiness and Prometheus metrics.

A deliberately small HTTP/1.1 server on the worker's own event loop, so that
a response at all proves the loop is not blocked. Each connection carries one
request: the server reads the request line and headers, sends one response
with ``Content-Length`` and ``Connection: close``, and closes.

- ``GET /healthz``: 200 while the fetch loop keeps polling, or while the
  worker is still joining its group; 503 when the last poll is older than
  ``max(3 x worker.poll_timeout_s, kafka.max_poll_interval_s)``.
- ``GET /readyz``: 200 only when the worker has joined its group, is not
  stopping, has no halted partition, and ``SELECT 1`` returns through the
  worker's pool within 2 seconds. Otherwise 503, with a JSON body that names
  the failing checks.
- ``GET /metrics``: the worker's registry in the Prometheus text format.

``HEAD`` is served like ``GET`` without the body. Requests are bounded: the
request line may hold 8 KiB, the head 32 KiB, and the whole head must arrive
within 5 seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from consumer import errors

if TYPE_CHECKING:
    import asyncpg

    from consumer.worker import Worker

__all__ = ["METRICS_CONTENT_TYPE", "ProbeResult", "probe", "probe_host", "serve"]

logger = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_JSON_CONTENT_TYPE = "application/json"

_MAX_REQUEST_LINE_BYTES = 8 * 1024
_MAX_HEAD_BYTES = 32 * 1024
_READ_TIMEOUT_S = 5.0
_DATABASE_CHECK_TIMEOUT_S = 2.0
# After an early error response, input is read and dropped for at most this
# long and this many bytes before the socket closes.
_LINGER_S = 1.0
_LINGER_MAX_BYTES = 256 * 1024
# Connections served at once. Further connections get 503 right away, so a
# flood of probes cannot pile up tasks or pool connections.
_MAX_CONNECTIONS = 32
# A worker whose fetch loop has not polled for this many poll timeouts is
# stuck, unless kafka.max_poll_interval_s allows longer.
_POLL_TIMEOUT_FACTOR = 3

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _JSON_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of one `probe`: the HTTP status, or the error when no response arrived."""

    url: str
    status: int | None
    body: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


class _BadRequest(Exception):
    """The request cannot be served; `status` is the HTTP status to send."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


async def serve(worker: Worker, *, task_status: anyio.abc.TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the endpoints of `worker` on ``worker.health_host:worker.health_port`` until cancelled.

    Reports the listening addresses (``host:port``) through `task_status`.
    Raises `errors.ConfigurationError` when the port cannot be bound.
    """
    server = _Server(worker)
    config = worker.settings.worker
    host, port = config.health_host, config.health_port
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port or 0)
    except OSError as exc:
        raise errors.ConfigurationError(
            f"the health server cannot listen on {host}:{port}: {exc}; "
            "set CONSUMER_WORKER__HEALTH_PORT to a free port or CONSUMER_WORKER__HEALTH_HOST to a local address"
        ) from exc

    async with listener:
        # S610 is about Django's QuerySet.extra; this is anyio's typed attribute lookup.
        local_address = anyio.abc.SocketAttribute.local_address
        addresses = [_format_address(sub.extra(local_address)) for sub in listener.listeners]  # noqa: S610
        logger.info(
            "health server listening on %s",
            ", ".join(addresses),
            extra={"action": "health_server_started", "group_id": worker.group_id, "addresses": addresses},
        )
        task_status.started(addresses)
        await listener.serve(server.handle_connection)


class _Server:
    """Routes requests to the checks of one worker."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._started_at = time.monotonic()
        self._connections = anyio.CapacityLimiter(_MAX_CONNECTIONS)
        # One database check at a time, so probes never hold more than one
        # connection of the pool that the partitions need.
        self._database_lock = anyio.Lock()

    async def handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        """Serve one request on `stream` and close it.

        Every error is caught and logged, so one bad client cannot end the server.
        """
        peer = _peer(stream)
        async with stream:
            try:
                self._connections.acquire_nowait()
            except anyio.WouldBlock:
                logger.warning(
                    "health server busy: %d connections open, rejecting %s",
                    _MAX_CONNECTIONS,
                    peer,
                    extra={"action": "health_request_rejected", "peer": peer},
                )
                await _send(stream, _json_response(503, {"status": "busy"}), head_only=False)
                await _linger(stream)
                return
            try:
                await self._serve_one(stream, peer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError) as exc:
                logger.debug(
                    "health client %s went away: %s",
                    peer,
                    type(exc).__name__,
                    extra={"action": "health_client_disconnected", "peer": peer},
                )
            except Exception:
                logger.exception(
                    "health request from %s failed", peer, extra={"action": "health_request_failed", "peer": peer}
                )
                await _send_quietly(stream, _json_response(500, {"status": "error"}))
            finally:
                self._connections.release()

    async def _serve_one(self, stream: anyio.abc.SocketStream, peer: str) -> None:
        try:
            method, target = await _read_request(stream)
        except _BadRequest as exc:
            logger.warning(
                "invalid health request from %s: %s",
                peer,
                exc,
                extra={"action": "health_request_invalid", "peer": peer, "status": exc.status},
            )
            await _send(stream, _json_response(exc.status, {"error": str(exc)}), head_only=False)
            await _linger(stream)
            return

        if method not in ("GET", "HEAD"):
            allow = (("Allow", "GET, HEAD"),)
            response = _json_response(405, {"error": f"method {method} is not allowed"}, headers=allow)
        else:
            response = await self._route(urlsplit(target).path)
        await _send(stream, response, head_only=method == "HEAD")

    async def _route(self, path: str) -> _Response:
        if path == "/healthz":
            return self._liveness()
        if path == "/readyz":
            return await self._readiness()
        if path == "/metrics":
            return self._metrics()
        return _json_response(404, {"error": f"no endpoint {path[:100]}; use /healthz, /readyz or /metrics"})

    def _liveness(self) -> _Response:
        worker = self._worker
        settings = worker.settings
        max_age_s = max(_POLL_TIMEOUT_FACTOR * settings.worker.poll_timeout_s, settings.kafka.max_poll_interval_s)
        last_poll_at = worker.last_poll_at if worker.last_poll_at is not None else self._started_at
        age_s = time.monotonic() - last_poll_at
        # A worker that is still joining its group, or is draining after a
        # stop with its fetch loop ended on purpose, is not stuck.
        alive = age_s <= max_age_s or not worker.joined or bool(worker.health()["stopping"])
        body = {
            "status": "ok" if alive else "stalled",
            "joined": worker.joined,
            "last_poll_age_s": round(age_s, 3),
            "max_poll_age_s": max_age_s,
        }
        return _json_response(200 if alive else 503, body)

    async def _readiness(self) -> _Response:
        worker = self._worker
        state = worker.health()
        checks: dict[str, dict[str, Any]] = {
            "joined": {"ok": bool(worker.joined)},
            "not_stopping": {"ok": not state["stopping"]},
            "no_halted_partition": {"ok": not state["halted"], "halted": state["halted"]},
            "postgres": await self._check_database(),
        }
        ready = all(check["ok"] for check in checks.values())
        failing = [name for name, check in checks.items() if not check["ok"]]
        body = {"status": "ready" if ready else "not_ready", "failing": failing, "checks": checks}
        return _json_response(200 if ready else 503, body)

    async def _check_database(self) -> dict[str, Any]:
        pool = _pool_of(self._worker)
        if pool is None:
            return {"ok": False, "error": "the worker has no database pool"}
        started = time.perf_counter()
        try:
            with anyio.fail_after(_DATABASE_CHECK_TIMEOUT_S):
                async with self._database_lock, pool.acquire() as connection:
                    await connection.fetchval("SELECT 1")
        except TimeoutError:
            error = f"SELECT 1 did not return within {_DATABASE_CHECK_TIMEOUT_S:g} s"
        except Exception as exc:
            # asyncpg raises PostgresError, InterfaceError or OSError subclasses
            # here, and any of them means the database cannot be used now.
            error = _redact(f"{type(exc).__name__}: {exc}", self._worker)
        else:
            return {"ok": True, "duration_s": round(time.perf_counter() - started, 4)}

        logger.warning(
            "readiness check: PostgreSQL failed: %s",
            error,
            extra={"action": "readiness_database_failed", "group_id": self._worker.group_id},
        )
        return {"ok": False, "error": error}

    def _metrics(self) -> _Response:
        self._worker.update_gauges()
        return _Response(200, self._worker.metrics.exposition(), METRICS_CONTENT_TYPE)


async def _read_request(stream: anyio.abc.SocketStream) -> tuple[str, str]:
    """Read the request line and the headers; return the method and the request target."""
    buffered = BufferedByteReceiveStream(stream)
    try:
        with anyio.fail_after(_READ_TIMEOUT_S):
            request_line = await _read_line(buffered, _MAX_REQUEST_LINE_BYTES, status=414)
            # Headers are read and dropped: closing a socket with unread data
            # makes the kernel send a reset, and the client may lose the response.
            head_bytes = len(request_line) + 2
            while line := await _read_line(buffered, _MAX_HEAD_BYTES, status=431):
                head_bytes += len(line) + 2
                if head_bytes > _MAX_HEAD_BYTES:
                    raise _BadRequest(431, f"request head is longer than {_MAX_HEAD_BYTES} bytes")
    except TimeoutError:
        raise _BadRequest(408, f"request head not received within {_READ_TIMEOUT_S:g} s") from None
    except anyio.IncompleteRead:
        raise _BadRequest(400, "connection closed before the end of the request head") from None

    parts = request_line.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _BadRequest(400, "request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise _BadRequest(505, f"unsupported protocol version {version[:20]!r}")
    return method, target


async def _read_line(buffered: BufferedByteReceiveStream, max_bytes: int, *, status: int) -> bytes:
    """Read one line ending in LF (CRLF or bare LF) and return it without the line ending."""
    try:
        line = await buffered.receive_until(b"\n", max_bytes)
    except anyio.DelimiterNotFound:
        raise _BadRequest(status, f"line is longer than {max_bytes} bytes") from None
    # receive_until checks max_bytes only before it reads more, so a long
    # line that arrived in one chunk comes back whole.
    if len(line) > max_bytes:
        raise _BadRequest(status, f"line is longer than {max_bytes} bytes")
    return line.removesuffix(b"\r")


async def _send(stream: anyio.abc.SocketStream, response: _Response, *, head_only: bool) -> None:
    reason = _REASONS.get(response.status, "")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    await stream.send(head if head_only else head + response.body)


async def _linger(stream: anyio.abc.SocketStream) -> None:
    """Discard what the client still sends, for a short while, after an early response.

    Closing a socket with unread data makes the kernel send a reset, which
    can destroy the response before the client reads it. Reading is bounded
    in time and bytes, so a client cannot hold the connection open.
    """
    await stream.send_eof()
    discarded = 0
    with anyio.move_on_after(_LINGER_S):
        while discarded < _LINGER_MAX_BYTES:
            try:
                discarded += len(await stream.receive())
            except anyio.EndOfStream:
                return


async def _send_quietly(stream: anyio.abc.SocketStream, response: _Response) -> None:
    """Send `response` unless the connection is already gone."""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await _send(stream, response, head_only=False)


def _json_response(status: int, body: dict[str, Any], *, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, json.dumps(body, default=str).encode() + b"\n", _JSON_CONTENT_TYPE, headers)


def _pool_of(worker: Worker) -> asyncpg.Pool | None:
    return worker.pool


def _redact(text: str, worker: Worker) -> str:
    """Remove the DSN and its password from an error message, in case a driver quotes them."""
    dsn = worker.settings.postgres.dsn
    if dsn is None:
        return text
    secret = dsn.get_secret_value()
    text = text.replace(secret, "***")
    password = urlsplit(secret).password
    if password:
        text = text.replace(password, "***")
    return text


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        return _format_address(stream.extra(anyio.abc.SocketAttribute.remote_address))  # noqa: S610
    except (anyio.TypedAttributeLookupError, OSError):
        return "unknown"


def _format_address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def probe_host(bind_host: str) -> str:
    """Return the address a local client uses to reach a server bound to `bind_host`."""
    # S104 flags the literal, but this compares it and binds nothing.
    if bind_host in ("", "0.0.0.0"):  # noqa: S104
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def probe(host: str, port: int, path: str, *, timeout_s: float) -> ProbeResult:
    """Send ``GET path`` to the health server and return the status and body.

    A failed connection or request is returned as `ProbeResult.error`, not
    raised. `http.client` is used directly rather than urllib, because urllib
    would send a local probe through ``HTTP_PROXY``.
    """
    url = f"http://{_format_address((host, port))}{path}"
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read(64 * 1024).decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        # TimeoutError and ConnectionRefusedError are OSErrors.
        return ProbeResult(url=url, status=None, error=f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()
    return ProbeResult(url=url, status=response.status, body=body)
