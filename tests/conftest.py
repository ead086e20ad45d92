"""Fixtures for the whole suite: a Kafka broker, PostgreSQL, a fresh database per test, topics and workers.

Environment variables:

- ``CONSUMER_TEST_KAFKA_BOOTSTRAP``: host:port list of a Kafka cluster to use
  instead of starting an embedded Tansu broker.
- ``CONSUMER_TEST_DATABASE_URL``: URL of a PostgreSQL user allowed to create
  databases. Without it the suite uses postgres@127.0.0.1:5432 when that
  server accepts a connection, or else starts an embedded PostgreSQL in a
  temporary folder.

Async tests run on asyncio through anyio's pytest plugin: mark them with
``@pytest.mark.anyio``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumer import embedded
from tests.support import db, kafka
from tests.support.process import WorkerProcess
from tests.support.waiting import run_blocking

KAFKA_BOOTSTRAP_VAR = "CONSUMER_TEST_KAFKA_BOOTSTRAP"
DATABASE_URL_VAR = "CONSUMER_TEST_DATABASE_URL"

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run every anyio test on asyncio, the only loop aiokafka and asyncpg support."""
    # Session scope lets session-scoped async fixtures share the loop.
    return "asyncio"


@pytest.fixture(scope="session")
def kafka_is_tansu() -> bool:
    """Whether the suite runs against the embedded Tansu broker, for tests that work around its bugs."""
    return not os.environ.get(KAFKA_BOOTSTRAP_VAR)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_is_tansu: bool) -> Iterator[str]:
    """Bootstrap servers of the Kafka cluster under test, as host:port[,host:port]."""
    if not kafka_is_tansu:
        yield os.environ[KAFKA_BOOTSTRAP_VAR]
        return

    with embedded.start_broker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL user that may create and drop databases."""
    configured = os.environ.get(DATABASE_URL_VAR)
    if configured:
        yield configured
        return

    if run_blocking(lambda: db.is_reachable(db.LOCAL_ADMIN_DSN)):
        yield db.LOCAL_ADMIN_DSN
        return

    logger.info("no PostgreSQL at %s, starting an embedded server", db.LOCAL_ADMIN_DSN)
    with embedded.start_postgres(tmp_path_factory.mktemp("postgres") / "data") as server:
        yield server.dsn


@pytest.fixture
def database_factory(pg_admin_dsn: str) -> Iterator[db.DatabaseFactory]:
    """Callable that creates a database, by name or with a unique name, and returns its URL.

    Every database it created is dropped after the test, after its sessions are terminated.
    """
    factory = db.DatabaseFactory(pg_admin_dsn)
    yield factory
    factory.drop_all()


@pytest.fixture
def database_url(database_factory: db.DatabaseFactory) -> str:
    """URL of an empty database named ``consumer_test_<hex>``, dropped after the test."""
    return database_factory()


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Callable ``(partitions=1, *, prefix="test") -> name`` that creates a uniquely named topic.

    Every topic it created is deleted after the test.
    """
    created: list[str] = []

    def create_topic(partitions: int = 1, *, prefix: str = "test") -> str:
        name = kafka.unique_topic_name(prefix)
        run_blocking(lambda: embedded.create_topic(kafka_bootstrap, name, partitions))
        created.append(name)
        return name

    yield create_topic
    run_blocking(lambda: kafka.delete_topics(kafka_bootstrap, created))


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Callable ``(*run_args, env=None) -> WorkerProcess`` that starts ``python -m consumer run``.

    Every worker still running after the test is killed with SIGKILL. The end of
    each worker's output is printed, so pytest shows it when the test fails.
    """
    workers: list[WorkerProcess] = []

    def start_worker(*run_args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess.run(*run_args, log_dir=tmp_path / f"worker-{len(workers)}", env=env)
        workers.append(worker)
        return worker

    yield start_worker
    for worker in workers:
        worker.close()
        print(worker.output_tail())
