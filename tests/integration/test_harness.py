"""Integration tests of the suite's fixtures and helpers against a real broker and real PostgreSQL."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psutil
import pytest

from consumer import embedded
from tests.support import db, kafka
from tests.support.process import REPO_ROOT, WorkerProcess
from tests.support.waiting import wait_for_sync

pytestmark = pytest.mark.integration

# A stand-in worker: it reports start-up, exits with code 3 on SIGTERM and prints its environment on request.
FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time

    def on_sigterm(signum, frame):
        print("terminating", file=sys.stderr, flush=True)
        sys.exit(3)

    signal.signal(signal.SIGTERM, on_sigterm)
    if "--print-env" in sys.argv:
        print(json.dumps({"action": "env", "environ": dict(os.environ)}))
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def start_fake_worker(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
    return WorkerProcess([sys.executable, "-c", FAKE_WORKER, *args], log_dir=tmp_path / "worker", env=env)


@pytest.mark.anyio
async def test_produce_and_consume_roundtrip(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(3)
    records = [
        kafka.Record(
            partition=i % 3,
            key=f"key-{i}".encode(),
            value=f"value-{i}".encode(),
            headers=[("index", str(i).encode()), ("empty", None)],
        )
        for i in range(10)
    ]
    group_id = f"harness-{uuid.uuid4().hex[:8]}"

    offsets = await kafka.produce(kafka_bootstrap, topic, records)
    consumed = await kafka.consume(kafka_bootstrap, topic, group_id=group_id, count=10)
    committed = await kafka.fetch_committed(kafka_bootstrap, group_id, topic, 3)

    assert offsets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    by_position = {(record.partition, record.offset): record for record in consumed}
    assert len(by_position) == 10
    for record, offset in zip(records, offsets, strict=True):
        received = by_position[(record.partition, offset)]
        assert received.topic == topic
        assert received.key == record.key
        assert received.value == record.value
        assert received.headers == record.headers
    assert committed == {0: 4, 1: 3, 2: 3}


@pytest.mark.anyio
async def test_fetch_committed_without_commit(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(2)

    committed = await kafka.fetch_committed(kafka_bootstrap, "harness-never-committed", topic, [0, 1])

    assert committed == {0: None, 1: None}


@pytest.mark.anyio
async def test_create_topic_twice_keeps_topic(kafka_bootstrap: str) -> None:
    topic = kafka.unique_topic_name("harness")

    await embedded.create_topic(kafka_bootstrap, topic, 3)
    await embedded.create_topic(kafka_bootstrap, topic, 3)
    offsets = await kafka.produce(kafka_bootstrap, topic, [kafka.Record(partition=2, value=b"x")])
    await kafka.delete_topics(kafka_bootstrap, [topic])

    assert offsets == [0]


@pytest.mark.anyio
async def test_database_url_is_empty(database_url: str, pg_admin_dsn: str) -> None:
    name = db.database_name(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        current = await connection.fetchval("SELECT current_database()")
        tables = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
    finally:
        await connection.close()

    assert name.startswith(db.DATABASE_PREFIX)
    assert current == name
    assert tables == 0
    assert await db.database_exists(pg_admin_dsn, name)


@pytest.mark.anyio
async def test_database_factory_drops_with_open_session(pg_admin_dsn: str) -> None:
    factory = db.DatabaseFactory(pg_admin_dsn)
    name = db.unique_database_name("consumer_test_named_")
    url = factory(name)
    open_session = await asyncpg.connect(url)

    try:
        factory.drop_all()
    finally:
        open_session.terminate()

    assert factory.created == []
    assert not await db.database_exists(pg_admin_dsn, name)


@pytest.mark.anyio
async def test_embedded_postgres_keeps_data_across_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"

    with embedded.start_postgres(data_dir) as server:
        connection = await asyncpg.connect(server.dsn)
        await connection.execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)")
        await connection.close()
    server.stop()

    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    # PostgreSQL removes its socket file on shutdown; a socket left behind would refuse the connection.
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await asyncpg.connect(server.dsn, timeout=2)

    with embedded.start_postgres(data_dir) as restarted:
        connection = await asyncpg.connect(restarted.dsn)
        kept = await connection.fetchval("SELECT id FROM kept")
        version = await connection.fetchval("SHOW server_version_num")
        await connection.close()

    assert kept == 7
    assert int(version) >= 180000
    assert restarted.data_dir == data_dir.resolve()


def test_worker_process_signals(tmp_path: Path) -> None:
    worker = start_fake_worker(tmp_path)
    worker.wait_for_output("ready")

    worker.stop_signal()
    wait_for_sync(lambda: psutil.Process(worker.pid).status() == psutil.STATUS_STOPPED, description="SIGSTOP")
    worker.terminate()
    still_running = worker.returncode

    worker.cont_signal()
    exit_code = worker.wait(timeout_s=10)

    assert still_running is None
    assert exit_code == 3
    assert "terminating" in worker.read_stderr()
    assert worker.read_stdout() == "ready\n"


def test_worker_process_kill(tmp_path: Path) -> None:
    worker = start_fake_worker(tmp_path)
    worker.wait_for_output("ready")

    worker.kill()

    assert worker.wait(timeout_s=10) == -9
    worker.close()


def test_worker_process_wait_timeout_shows_output(tmp_path: Path) -> None:
    with start_fake_worker(tmp_path) as worker:
        worker.wait_for_output("ready")

        with pytest.raises(AssertionError, match=r"still running after 0\.2 s") as raised:
            worker.wait(timeout_s=0.2)

    assert "ready" in str(raised.value)
    assert worker.returncode == -9


def test_worker_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUMER_KAFKA__GROUP_ID", "from-the-shell")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")

    with start_fake_worker(tmp_path, "--print-env", env={"CONSUMER_POSTGRES__DSN": "postgresql://x/y"}) as worker:
        worker.wait_for_output("ready")
        records = worker.log_records()

    assert len(records) == 1
    environ = records[0]["environ"]
    assert "CONSUMER_KAFKA__GROUP_ID" not in environ
    assert environ["CONSUMER_POSTGRES__DSN"] == "postgresql://x/y"
    assert environ["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"]
    assert environ["PYTHONUNBUFFERED"] == "1"


def test_worker_process_exit_before_output(tmp_path: Path) -> None:
    worker = WorkerProcess([sys.executable, "-c", "import sys; sys.exit(4)"], log_dir=tmp_path)

    with pytest.raises(AssertionError, match="exited with code 4 without writing 'ready'"):
        worker.wait_for_output("ready", timeout_s=10)
