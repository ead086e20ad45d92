"""The health server's HTTP handling and checks, served in-process for a stub worker.

The stub has the attributes `consumer.health` reads from a `Worker`, and a
fake pool whose ``SELECT 1`` succeeds, fails or hangs on request. Timeouts
are shortened with monkeypatch so that the bounds are tested in well under
a second each.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from consumer import errors, health
from consumer.metrics import Metrics
from consumer.settings import KafkaSettings, PostgresSettings, Settings, WorkerSettings
from tests.operations.helpers import free_port, get

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

# A made-up password; the tests check that it never leaves the server.
CANARY_PASSWORD = "canary-pw-5f1d2c"  # noqa: S105
HALT_REASON = "ConnectionDoesNotExistError: connection was closed"


class FakeConnection:
    def __init__(self, pool: FakePool) -> None:
        self._pool = pool

    async def fetchval(self, query: str) -> int:
        assert query == "SELECT 1"
        if self._pool.hang_s:
            await anyio.sleep(self._pool.hang_s)
        if self._pool.error is not None:
            raise self._pool.error
        return 1


class FakePool:
    """Stands in for an asyncpg pool: ``acquire()`` yields a connection whose SELECT 1 obeys `error` and `hang_s`."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.hang_s = 0.0
        self.acquired = 0

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConnection]:
        self.acquired += 1
        yield FakeConnection(self)


class StubWorker:
    """The part of `consumer.worker.Worker` that the health server reads."""

    def __init__(self) -> None:
        self.settings = Settings(
            kafka=KafkaSettings(max_poll_interval_s=1.0),
            postgres=PostgresSettings(dsn=f"postgresql://app:{CANARY_PASSWORD}@127.0.0.1:5432/app"),
            worker=WorkerSettings(health_port=0, health_host="127.0.0.1", poll_timeout_s=0.1),
        )
        self.group_id = "stub-group"
        self.joined = True
        self.last_poll_at: float | None = time.monotonic()
        self.stopping = False
        self.halted: dict[str, str] = {}
        self.metrics = Metrics(self.group_id)
        self.gauge_updates = 0
        self._pool: FakePool | None = FakePool()

    @property
    def pool(self) -> FakePool | None:
        return self._pool

    def health(self) -> dict[str, Any]:
        return {"stopping": self.stopping, "halted": dict(self.halted)}

    def update_gauges(self) -> None:
        self.gauge_updates += 1


@asynccontextmanager
async def serving(worker: StubWorker) -> AsyncIterator[int]:
    """Run `health.serve` for ``worker`` on a random port of 127.0.0.1 and yield the port."""
    async with anyio.create_task_group() as task_group:
        addresses = await task_group.start(health.serve, worker)
        yield int(addresses[0].rsplit(":", 1)[1])
        task_group.cancel_scope.cancel()


async def raw_request(port: int, data: bytes, *, pause_s: float = 0.0) -> bytes:
    """Send ``data`` as is, optionally wait, and return everything the server sends until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        if data:
            await stream.send(data)
        if pause_s:
            await anyio.sleep(pause_s)
        received = b""
        with anyio.fail_after(10):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_endpoints_return_expected_statuses() -> None:
    worker = StubWorker()
    async with serving(worker) as port:
        healthz = await get(port, "/healthz")
        readyz = await get(port, "/readyz")
        metrics = await get(port, "/metrics?name[]=x")
        missing = await get(port, "/nope")
        posted = await get(port, "/healthz", method="POST")
        head = await get(port, "/readyz", method="HEAD")

    assert healthz.status == 200
    assert json.loads(healthz.body)["status"] == "ok"
    assert readyz.status == 200
    assert json.loads(readyz.body)["status"] == "ready"
    assert json.loads(readyz.body)["failing"] == []
    assert metrics.status == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE consumer_messages_processed_total counter" in metrics.body
    assert worker.gauge_updates == 1
    assert missing.status == 404
    assert posted.status == 405
    assert posted.headers["allow"] == "GET, HEAD"
    assert head.status == 200
    assert head.body == ""
    assert int(head.headers["content-length"]) > 0
    assert readyz.headers["connection"] == "close"


async def test_healthz_fails_when_polling_stalls() -> None:
    worker = StubWorker()
    async with serving(worker) as port:
        worker.last_poll_at = time.monotonic() - 5.0
        stalled = await get(port, "/healthz")

        worker.joined = False
        joining = await get(port, "/healthz")

        worker.joined = True
        worker.stopping = True
        stopping = await get(port, "/healthz")

    assert stalled.status == 503
    body = json.loads(stalled.body)
    assert body["status"] == "stalled"
    # max(3 x 0.1 s poll timeout, 1.0 s max poll interval)
    assert body["max_poll_age_s"] == 1.0
    assert joining.status == 200
    assert stopping.status == 200


async def test_readyz_names_each_failing_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "_DATABASE_CHECK_TIMEOUT_S", 0.2)
    worker = StubWorker()
    pool = worker._pool
    assert pool is not None
    async with serving(worker) as port:
        worker.joined = False
        joining = json.loads((await get(port, "/readyz")).body)

        worker.joined = True
        worker.halted = {"orders-3": HALT_REASON}
        halted = json.loads((await get(port, "/readyz")).body)

        worker.halted = {}
        worker.stopping = True
        stopping = json.loads((await get(port, "/readyz")).body)

        worker.stopping = False
        pool.error = ConnectionError(f"cannot reach postgresql://app:{CANARY_PASSWORD}@127.0.0.1:5432/app")
        failing = await get(port, "/readyz")

        pool.error = None
        pool.hang_s = 1.0
        started = time.monotonic()
        slow = await get(port, "/readyz")
        slow_s = time.monotonic() - started

        pool.hang_s = 0.0
        worker._pool = None
        no_pool = json.loads((await get(port, "/readyz")).body)

    assert joining["failing"] == ["joined"]
    assert halted["failing"] == ["no_halted_partition"]
    assert halted["checks"]["no_halted_partition"]["halted"] == {"orders-3": HALT_REASON}
    assert stopping["failing"] == ["not_stopping"]
    assert failing.status == 503
    assert json.loads(failing.body)["failing"] == ["postgres"]
    assert "ConnectionError" in failing.body
    assert CANARY_PASSWORD not in failing.body
    assert json.loads(slow.body)["failing"] == ["postgres"]
    assert "did not return within 0.2 s" in slow.body
    assert slow_s < 1.0
    assert no_pool["failing"] == ["postgres"]


async def test_readyz_probes_share_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = StubWorker()
    pool = worker._pool
    assert pool is not None
    pool.hang_s = 0.2
    async with serving(worker) as port, anyio.create_task_group() as task_group:
        for _ in range(5):
            task_group.start_soon(get, port, "/readyz")
        await anyio.sleep(0.1)
        # The checks run one at a time, so only the first has acquired a connection yet.
        assert pool.acquired == 1
    assert pool.acquired == 5


LONG_TARGET = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"
LONG_HEADER = b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"b" * 33000 + b"\r\n\r\n"
# 6,000 short lines of 6 bytes each make a 36,000-byte head.
MANY_HEADERS = b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 6000 + b"\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "expected_status"),
    [
        pytest.param(LONG_TARGET, 414, id="request-line-over-8KiB"),
        pytest.param(LONG_HEADER, 431, id="header-over-32KiB"),
        pytest.param(MANY_HEADERS, 431, id="head-over-32KiB"),
        pytest.param(b"HELLO\r\n\r\n", 400, id="not-a-request-line"),
        pytest.param(b"GET /healthz HTTP/2.0\r\n\r\n", 505, id="http-2"),
        pytest.param(b"GET /healthz HTTP/1.0\n\n", 200, id="bare-lf-http-1.0"),
    ],
)
async def test_request_head_is_bounded(request_bytes: bytes, expected_status: int) -> None:
    async with serving(StubWorker()) as port:
        response = await raw_request(port, request_bytes)
    assert status_of(response) == expected_status


async def test_slow_request_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "_READ_TIMEOUT_S", 0.3)
    async with serving(StubWorker()) as port:
        started = time.monotonic()
        response = await raw_request(port, b"GET /healthz HTTP/1.1\r\n")
        elapsed_s = time.monotonic() - started
        # The server still serves other clients afterwards.
        after = await get(port, "/healthz")
    assert status_of(response) == 408
    assert 0.25 <= elapsed_s < 3.0
    assert after.status == 200


async def test_client_closing_early_leaves_server_running() -> None:
    async with serving(StubWorker()) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /heal")
        after = await get(port, "/healthz")
    assert after.status == 200


async def test_connections_over_limit_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "_MAX_CONNECTIONS", 2)
    async with serving(StubWorker()) as port:
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        try:
            await anyio.sleep(0.1)
            rejected = await raw_request(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        finally:
            for stream in idle:
                await stream.aclose()
        await anyio.sleep(0.1)
        after = await get(port, "/healthz")
    assert status_of(rejected) == 503
    assert after.status == 200


async def test_port_in_use_is_a_configuration_error() -> None:
    worker = StubWorker()
    port = free_port()
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port):
        worker.settings.worker.health_port = port
        with pytest.raises(errors.ConfigurationError, match="CONSUMER_WORKER__HEALTH_PORT"):
            await health.serve(worker)  # type: ignore[arg-type]


def test_probe_host_maps_wildcards_to_loopback() -> None:
    assert health.probe_host("0.0.0.0") == "127.0.0.1"
    assert health.probe_host("") == "127.0.0.1"
    assert health.probe_host("::") == "::1"
    assert health.probe_host("10.1.2.3") == "10.1.2.3"
