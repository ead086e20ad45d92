"""The pytest plugin of the testing kit, registered by the ``testing`` extra as ``consumer``.

Fixtures (every name starts with ``consumer_``):

- ``consumer_broker`` (session): bootstrap servers of a Kafka broker. It is
  ``CONSUMER_TESTING_KAFKA_BOOTSTRAP`` when set, else an embedded Tansu
  broker started on 127.0.0.1 for the session.
- ``consumer_postgres`` (session): URL of a PostgreSQL user that may create
  databases. It is ``CONSUMER_TESTING_DATABASE_URL`` when set, else an
  embedded PostgreSQL started in a temporary folder for the session.
- ``consumer_database``: URL of a fresh database with the framework's schema,
  dropped after the test.
- ``consumer_harness``: ``(handler, **options) -> InboxHarness`` over a fresh
  database with the framework's and the handler's migrations.
- ``consumer_scenario``: ``(handler, *, partitions=1, **options) ->
  WorkerScenario`` over a fresh database and a new topic, deleted after the test.

The fixtures are synchronous, so they work with anyio's and pytest-asyncio's
plugins alike; the objects they return have async methods. A conftest
fixture of the same name overrides any of them, for example to point
``consumer_postgres`` at a server the suite already runs.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from consumer import embedded
from consumer.handler import Handler
from consumer.testing.databases import DatabaseFactory, run_sync
from consumer.testing.harness import InboxHarness
from consumer.testing.scenarios import WorkerScenario

__all__ = [
    "DATABASE_URL_VAR",
    "KAFKA_BOOTSTRAP_VAR",
    "consumer_broker",
    "consumer_database",
    "consumer_databases",
    "consumer_harness",
    "consumer_postgres",
    "consumer_scenario",
]

KAFKA_BOOTSTRAP_VAR = "CONSUMER_TESTING_KAFKA_BOOTSTRAP"
DATABASE_URL_VAR = "CONSUMER_TESTING_DATABASE_URL"

logger = logging.getLogger(__name__)

HarnessFactory = Callable[..., InboxHarness]
ScenarioFactory = Callable[..., WorkerScenario]


@pytest.fixture(scope="session")
def consumer_broker() -> Iterator[str]:
    """Bootstrap servers of the Kafka broker for the session, as host:port[,host:port]."""
    configured = os.environ.get(KAFKA_BOOTSTRAP_VAR)
    if configured:
        yield configured
        return
    with embedded.start_broker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def consumer_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL user that may create and drop databases."""
    configured = os.environ.get(DATABASE_URL_VAR)
    if configured:
        yield configured
        return
    with embedded.start_postgres(tmp_path_factory.mktemp("consumer-postgres") / "data") as server:
        yield server.dsn


@pytest.fixture(scope="session")
def consumer_databases(consumer_postgres: str) -> Iterator[DatabaseFactory]:
    """Creates databases with the framework's schema, each a copy of one template migrated per session."""
    factory = DatabaseFactory(consumer_postgres)
    yield factory
    factory.drop_all()


@pytest.fixture
def consumer_database(consumer_databases: DatabaseFactory) -> Iterator[str]:
    """URL of an empty database with the framework's schema, dropped after the test."""
    url = consumer_databases.create()
    yield url
    consumer_databases.drop(url)


@pytest.fixture
def consumer_harness(consumer_databases: DatabaseFactory) -> Iterator[HarnessFactory]:
    """Callable ``(handler, **options) -> InboxHarness``, each over a database of its own.

    The database has the framework's migrations and the handler's own
    ``migrations`` folder. `options` go to `InboxHarness` (topic, group_id,
    dedup_scope, max_attempts, handler_timeout_s).
    """
    urls: list[str] = []

    def make(handler: Handler[Any] | type[Handler[Any]], **options: Any) -> InboxHarness:
        url = consumer_databases.create([handler])
        urls.append(url)
        return InboxHarness(handler, url, **options)

    yield make
    for url in urls:
        consumer_databases.drop(url)


@pytest.fixture
def consumer_scenario(consumer_broker: str, consumer_databases: DatabaseFactory) -> Iterator[ScenarioFactory]:
    """Callable ``(handler, *, partitions=1, **options) -> WorkerScenario`` with a new topic and database.

    `handler` is a class or an instance. `options` go to `WorkerScenario`
    (group_id, dedup_scope, worker_settings, kafka_settings). Topics are
    deleted and databases dropped after the test.
    """
    urls: list[str] = []
    topics: list[str] = []

    def make(handler: Handler[Any] | type[Handler[Any]], *, partitions: int = 1, **options: Any) -> WorkerScenario:
        instance = handler() if isinstance(handler, type) else handler
        url = consumer_databases.create([instance])
        urls.append(url)
        topic = f"{type(instance).topics[0]}-{uuid.uuid4().hex[:12]}"
        run_sync(lambda: embedded.create_topic(consumer_broker, topic, partitions))
        topics.append(topic)
        return WorkerScenario(
            handler=instance, bootstrap_servers=consumer_broker, dsn=url, topic=topic, partitions=partitions, **options
        )

    yield make
    run_sync(lambda: _delete_topics(consumer_broker, topics))
    for url in urls:
        consumer_databases.drop(url)


async def _delete_topics(bootstrap_servers: str, topics: list[str]) -> None:
    """Delete `topics`; a failure is logged, because a leftover topic only costs space on a test broker."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        await admin.start()
        await admin.delete_topics(topics)
    except KafkaError as exc:
        logger.warning("deleting test topics %s failed: %s", ", ".join(topics), exc)
    finally:
        await admin.close()
