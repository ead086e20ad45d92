"""Workers connect to Kafka over TLS and SASL, and to PostgreSQL over verified TLS.

Kafka over TLS: Tansu 0.6.0 cannot serve TLS itself, because its broker
command rejects ``--cert`` together with ``--key`` ("cannot be used with"),
and with either one alone it still speaks plain TCP (a TLS handshake
times out). So a TLS-terminating proxy on 127.0.0.1 forwards to a plain
Tansu that advertises the proxy's address, and every connection of the
worker goes through TLS verified against a CA made by the test.

SASL: see `SASL_SKIP_REASON`. The test runs against a real Kafka cluster
when ``CONSUMER_TEST_SASL_BOOTSTRAP``, ``CONSUMER_TEST_SASL_USER`` and
``CONSUMER_TEST_SASL_PASSWORD`` are set (``CONSUMER_TEST_SASL_MECHANISM``,
``CONSUMER_TEST_SASL_PROTOCOL`` and ``CONSUMER_TEST_SASL_CAFILE`` are
optional).

PostgreSQL over TLS: a throwaway PostgreSQL 15 with ``ssl=on`` and a
certificate for 127.0.0.1, whose pg_hba.conf rejects connections without
TLS; the worker connects with ``sslmode=verify-full``.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from consumer import kafka as consumer_kafka
from consumer.settings import KafkaSettings
from tests.acceptance.helpers import (
    ASSIGNED_LINE,
    Deployment,
    Rows,
    order_record,
    wait_for_exit,
    wait_for_output,
    wait_for_positions,
)
from tests.operations.helpers import (
    Certificates,
    TlsPostgres,
    TlsProxy,
    free_port,
    make_certificates,
    postgres_available,
    run_cli_async,
    start_tansu,
    start_tls_postgres,
    start_worker,
)
from tests.support import kafka
from tests.support.process import WorkerProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

SASL_SKIP_REASON = (
    "Tansu 0.6.0 cannot serve SCRAM logins here: `tansu user create` is rejected with NotAuthenticated by a broker "
    "started with --authentication, and a broker without it offers no SASL mechanism. Set "
    "CONSUMER_TEST_SASL_BOOTSTRAP, CONSUMER_TEST_SASL_USER and CONSUMER_TEST_SASL_PASSWORD to test a real Kafka."
)


async def produce_with(settings: KafkaSettings, topic: str, records: list[kafka.Record]) -> None:
    """Produce ``records`` one request each through a producer built by `consumer.kafka` from ``settings``."""
    # NOTE: one record per request and no idempotence, as in tests.support.kafka,
    # because Tansu 0.6 mishandles both.
    producer = consumer_kafka.producer(settings, enable_idempotence=False)
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(
                topic, value=record.value, key=record.key, partition=record.partition, headers=list(record.headers)
            )
    finally:
        await producer.stop()


async def create_topic_with(settings: KafkaSettings, topic: str) -> None:
    admin = consumer_kafka.admin(settings)
    await admin.start()
    try:
        from aiokafka.admin import NewTopic

        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def delete_topic_with(settings: KafkaSettings, topic: str) -> None:
    admin = consumer_kafka.admin(settings)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


def secure_env(settings: KafkaSettings) -> dict[str, str]:
    """Return the CONSUMER_KAFKA__* variables of the security fields of ``settings``."""
    env = {"CONSUMER_KAFKA__SECURITY_PROTOCOL": settings.security_protocol}
    if settings.ssl_cafile is not None:
        env["CONSUMER_KAFKA__SSL_CAFILE"] = str(settings.ssl_cafile)
    if settings.sasl_mechanism is not None:
        env["CONSUMER_KAFKA__SASL_MECHANISM"] = settings.sasl_mechanism
    if settings.sasl_username is not None:
        env["CONSUMER_KAFKA__SASL_USERNAME"] = settings.sasl_username
    if settings.sasl_password is not None:
        env["CONSUMER_KAFKA__SASL_PASSWORD"] = settings.sasl_password.get_secret_value()
    return env


async def run_orders_through(deployment: Deployment, settings: KafkaSettings, *, name: str) -> WorkerProcess:
    """Migrate, start a worker with ``settings``' security, produce two orders and a duplicate, wait for them."""
    await deployment.migrate()
    worker = start_worker(deployment, name, secure_env(settings))
    await wait_for_output(worker, ASSIGNED_LINE, timeout_s=60)
    await produce_with(settings, deployment.topic, [order_record("k-1"), order_record("k-1"), order_record("k-2")])
    rows = await Rows.open(deployment)
    try:
        await wait_for_positions(rows, {0: 3}, timeout_s=60)
        assert await rows.effects_per_key() == {"k-1": 1, "k-2": 1}
    finally:
        await rows.close()
    return worker


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def tls_kafka(tmp_path: Path, certificates: Certificates) -> Iterator[KafkaSettings]:
    """Settings of a TLS listener on 127.0.0.1: a proxy in front of a plain Tansu that advertises it."""
    proxy_port, broker_port = free_port(), free_port()
    broker = start_tansu(broker_port, advertised_port=proxy_port, log_path=tmp_path / "tansu.log")
    proxy = TlsProxy(proxy_port, broker_port, certificates).start()
    try:
        yield KafkaSettings(
            bootstrap_servers=[f"127.0.0.1:{proxy_port}"], security_protocol="SSL", ssl_cafile=certificates.ca
        )
    finally:
        proxy.stop()
        broker.stop()


async def test_worker_consumes_over_tls(
    tls_kafka: KafkaSettings,
    database_url: str,
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    topic = f"operations-tls-{uuid.uuid4().hex[:8]}"
    await create_topic_with(tls_kafka, topic)
    deployment = Deployment(
        bootstrap=tls_kafka.bootstrap_servers[0],
        topic=topic,
        database_url=database_url,
        start_process=worker_factory,
        log_dir=tmp_path,
    )

    await run_orders_through(deployment, tls_kafka, name="tls")

    # A CA that did not sign the broker's certificate fails the handshake, so the worker cannot start.
    other_ca = make_certificates(tmp_path / "other-tls").ca
    untrusted = tls_kafka.model_copy(update={"ssl_cafile": other_ca})
    rejected = start_worker(deployment, "untrusted", secure_env(untrusted))
    exit_code = await wait_for_exit(rejected, timeout_s=90)
    assert exit_code == 3, rejected.output_tail()
    assert "CERTIFICATE_VERIFY_FAILED" in rejected.read_stderr()
    assert "cannot connect to Kafka" in rejected.read_stderr()


def sasl_settings_from_env() -> KafkaSettings | None:
    bootstrap = os.environ.get("CONSUMER_TEST_SASL_BOOTSTRAP")
    user = os.environ.get("CONSUMER_TEST_SASL_USER")
    password = os.environ.get("CONSUMER_TEST_SASL_PASSWORD")
    if not (bootstrap and user and password):
        return None
    cafile = os.environ.get("CONSUMER_TEST_SASL_CAFILE")
    return KafkaSettings.model_validate(
        {
            "bootstrap_servers": bootstrap,
            "security_protocol": os.environ.get("CONSUMER_TEST_SASL_PROTOCOL", "SASL_PLAINTEXT"),
            "sasl_mechanism": os.environ.get("CONSUMER_TEST_SASL_MECHANISM", "SCRAM-SHA-256"),
            "sasl_username": user,
            "sasl_password": password,
            "ssl_cafile": cafile or None,
        }
    )


async def test_worker_logs_in_with_sasl_scram(
    database_url: str, worker_factory: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    settings = sasl_settings_from_env()
    if settings is None:
        pytest.skip(SASL_SKIP_REASON)

    topic = f"operations-sasl-{uuid.uuid4().hex[:8]}"
    await create_topic_with(settings, topic)
    try:
        deployment = Deployment(
            bootstrap=",".join(settings.bootstrap_servers),
            topic=topic,
            database_url=database_url,
            start_process=worker_factory,
            log_dir=tmp_path,
        )
        worker = await run_orders_through(deployment, settings, name="sasl")
        worker.send_signal(signal.SIGTERM)
        assert await wait_for_exit(worker, timeout_s=60) == 0
        assert settings.sasl_password is not None
        assert settings.sasl_password.get_secret_value() not in worker.output()
    finally:
        await delete_topic_with(settings, topic)


@pytest.fixture
def tls_postgres(certificates: Certificates) -> Iterator[TlsPostgres]:
    """A throwaway PostgreSQL that accepts only TLS; its folder lives outside the root-only pytest folder."""
    reason = postgres_available()
    if reason is not None:
        pytest.skip(f"cannot start a throwaway PostgreSQL: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="consumer-pg-tls-"))
    try:
        server = start_tls_postgres(folder, certificates)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_worker_connects_to_postgres_with_verified_tls(
    tls_postgres: TlsPostgres,
    certificates: Certificates,
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    verified = {"sslmode": "verify-full", "sslrootcert": str(certificates.ca)}
    admin = await asyncpg.connect(tls_postgres.dsn(**verified))
    try:
        await admin.execute("CREATE DATABASE app")
    finally:
        await admin.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(tls_postgres.dsn("app", sslmode="disable"))

    deployment = Deployment(
        bootstrap=kafka_bootstrap,
        topic=topic_factory(1, prefix="operations"),
        database_url=tls_postgres.dsn("app", **verified),
        start_process=worker_factory,
        log_dir=tmp_path,
    )
    plain = KafkaSettings(bootstrap_servers=[kafka_bootstrap])
    await run_orders_through(deployment, plain, name="pg-tls")

    monitor = await asyncpg.connect(tls_postgres.dsn("app", **verified))
    try:
        sessions = await monitor.fetch(
            "SELECT s.ssl, s.version FROM pg_stat_ssl AS s JOIN pg_stat_activity AS a USING (pid)"
            " WHERE a.datname = 'app' AND a.application_name = 'consumer'"
        )
    finally:
        await monitor.close()
    assert sessions, "the worker has no session in pg_stat_activity"
    assert all(session["ssl"] for session in sessions)
    assert all(session["version"].startswith("TLSv1.") for session in sessions)

    status = await run_cli_async(
        "status", "--json", "--no-broker", env={"CONSUMER_POSTGRES__DSN": deployment.database_url}
    )
    assert status.returncode == 0, status.stderr
    assert '"next_offset": 3' in status.stdout

    # A root certificate that did not sign the server's certificate is rejected.
    other_ca = make_certificates(tmp_path / "other-tls").ca
    untrusted = tls_postgres.dsn("app", sslmode="verify-full", sslrootcert=str(other_ca))
    rejected = await run_cli_async("status", "--no-broker", env={"CONSUMER_POSTGRES__DSN": untrusted})
    assert rejected.returncode == 3
    assert "cannot connect to PostgreSQL" in rejected.stderr
