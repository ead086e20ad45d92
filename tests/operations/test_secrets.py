"""Secrets never reach the output of ``run``, ``status``, ``healthcheck`` and ``config``, nor ``/metrics``.

The DSN carries a made-up password of a role created for the test, and the
SASL and key passwords are made-up strings too. The worker connects over
PLAINTEXT, so the SASL settings are loaded and validated but not sent.
NOTE: a server that trusts local connections accepts the DSN without
checking the password; the password is still in the DSN the CLI parses.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from tests.acceptance.helpers import (
    ASSIGNED_LINE,
    STOPPED_LINE,
    Deployment,
    Rows,
    order_record,
    wait_for_exit,
    wait_for_output,
    wait_for_positions,
)
from tests.integration.helpers import url_with_user
from tests.operations.helpers import free_port, get, health_settings, run_cli_async, start_worker, wait_for_status
from tests.support import db, kafka
from tests.support.process import WorkerProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]


@pytest.fixture
async def canary_role(pg_admin_dsn: str, database_url: str) -> AsyncIterator[tuple[str, str]]:
    """A login role with a unique password that owns the test database; yields (role, password)."""
    role = f"canary_{uuid.uuid4().hex[:12]}"
    password = f"pg-canary-{uuid.uuid4().hex}"
    database = db.database_name(database_url)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        # Identifiers are generated above; a password cannot be a query parameter in CREATE ROLE.
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await admin.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')
        yield role, password
    finally:
        # The database must go before the role that owns it and its objects.
        await db.drop_database(pg_admin_dsn, database)
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_secrets_absent_from_output_and_metrics(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    database_url: str,
    canary_role: tuple[str, str],
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    role, pg_password = canary_role
    sasl_password = f"sasl-canary-{uuid.uuid4().hex}"
    key_password = f"key-canary-{uuid.uuid4().hex}"
    canaries = [pg_password, sasl_password, key_password]
    dsn = url_with_user(database_url, role, pg_password)
    port = free_port()
    deployment = Deployment(
        bootstrap=kafka_bootstrap,
        topic=topic_factory(1, prefix="operations"),
        database_url=dsn,
        start_process=worker_factory,
        log_dir=tmp_path,
    )
    secrets = {
        "CONSUMER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
        "CONSUMER_KAFKA__SASL_USERNAME": "canary-user",
        "CONSUMER_KAFKA__SASL_PASSWORD": sasl_password,
        "CONSUMER_KAFKA__SSL_KEY_PASSWORD": key_password,
    }
    cli_env = {key: value for key, value in deployment.env().items() if key.startswith("CONSUMER_")}
    cli_env.update(secrets)
    cli_env["CONSUMER_WORKER__HEALTH_PORT"] = str(port)
    outputs: dict[str, str] = {}

    await deployment.migrate()
    worker = start_worker(deployment, "canary", {**health_settings(port), "CONSUMER_LOG__LEVEL": "DEBUG", **secrets})
    await wait_for_output(worker, ASSIGNED_LINE, timeout_s=30)
    poison = kafka.Record(key=b"bad", value=b"not json", headers=[("Idempotency-Key", b"k-bad")])
    await deployment.produce([order_record("k-1"), order_record("k-1"), poison, order_record("k-2")])
    rows = await Rows.open(deployment)
    try:
        await wait_for_positions(rows, {0: 4}, timeout_s=30)
    finally:
        await rows.close()

    await wait_for_status(port, "/readyz", 200, timeout_s=20)
    for path in ("/metrics", "/healthz", "/readyz"):
        outputs[path] = (await get(port, path)).body
    for name, args in {
        "status": ["status"],
        "status --json": ["status", "--json"],
        "healthcheck": ["healthcheck"],
        "config": ["config"],
        "config -v": ["config", "-v"],
    }.items():
        result = await run_cli_async(*args, env=cli_env)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        outputs[name] = result.stdout + result.stderr

    # Failing commands print connection errors, which must mask the password too.
    closed_dsn = url_with_user(f"postgresql://127.0.0.1:{free_port()}/nothing", role, pg_password)
    failed = await run_cli_async("status", "-v", "--no-broker", env={**cli_env, "CONSUMER_POSTGRES__DSN": closed_dsn})
    assert failed.returncode == 3
    outputs["status unreachable"] = failed.stdout + failed.stderr

    worker.send_signal(signal.SIGTERM)
    assert await wait_for_exit(worker, timeout_s=30) == 0
    assert STOPPED_LINE in worker.read_stderr()
    outputs["run"] = worker.output()

    assert "consumer_messages_processed_total" in outputs["/metrics"]
    assert '"sasl_password": "***"' in outputs["config"]
    assert "canary-user" in outputs["config"]
    assert role in outputs["status unreachable"]
    for name, text in outputs.items():
        for canary in canaries:
            assert canary not in text, f"a secret appears in the output of {name}"
