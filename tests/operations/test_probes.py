"""The health server of a ``consumer run`` subprocess: metrics match what happened, probes follow the worker's state.

Each test runs the CLI against the suite's broker and a fresh database, with
``CONSUMER_WORKER__HEALTH_PORT`` on a free port, and checks the endpoints and
``consumer healthcheck`` from outside, as Kubernetes and Docker do.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

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
    free_port,
    get,
    health_settings,
    metric_value,
    run_cli_async,
    start_worker,
    wait_for_status,
)
from tests.support import db, kafka

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

Deploy = Callable[[int], Awaitable[tuple[Deployment, Rows]]]


def poison_record(key: str) -> kafka.Record:
    """A message whose value is not JSON, so the handler's payload cannot be decoded."""
    return kafka.Record(key=key.encode(), value=b"{not json", headers=[("Idempotency-Key", key.encode())])


def healthcheck_env(port: int | None) -> dict[str, str]:
    return {} if port is None else {"CONSUMER_WORKER__HEALTH_PORT": str(port)}


async def test_metrics_match_processed_messages(deploy: Deploy) -> None:
    deployment, rows = await deploy(1)
    port = free_port()
    worker = start_worker(deployment, "metrics", health_settings(port))
    await wait_for_output(worker, ASSIGNED_LINE, timeout_s=30)

    # Four orders, two producer duplicates (same key and payload at a new
    # offset) and one message that is not JSON: seven offsets in all.
    await deployment.produce(
        [
            order_record("k-1"),
            order_record("k-2"),
            order_record("k-1"),
            order_record("k-3"),
            poison_record("k-bad"),
            order_record("k-2"),
            order_record("k-4"),
        ]
    )
    await wait_for_positions(rows, {0: 7}, timeout_s=30)

    response = await get(port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    labels = {"group": deployment.group_id, "topic": deployment.topic}
    text = response.body
    assert metric_value(text, "consumer_messages_processed_total", labels) == 4
    assert metric_value(text, "consumer_duplicates_skipped_total", {**labels, "cause": "key"}) == 2
    assert metric_value(text, "consumer_duplicates_skipped_total", {**labels, "cause": "position"}) == 0
    assert metric_value(text, "consumer_dead_letters_total", {**labels, "reason": "decode"}) == 1
    assert metric_value(text, "consumer_assigned_partitions", {"group": deployment.group_id}) == 1
    assert metric_value(text, "consumer_halted_partitions", {"group": deployment.group_id}) == 0
    assert metric_value(text, "consumer_rebalances_total", {"group": deployment.group_id}) >= 1
    # update_gauges runs before each scrape, so the lag reflects the last fetch.
    lag_labels = {**labels, "partition": "0"}
    assert metric_value(text, "consumer_partition_lag_messages", lag_labels) == 0

    # The database agrees with the counters.
    assert await rows.effects_per_key() == {"k-1": 1, "k-2": 1, "k-3": 1, "k-4": 1}
    assert await rows.dead_letter_count() == 1

    healthz = await get(port, "/healthz")
    assert healthz.status == 200
    assert json.loads(healthz.body)["status"] == "ok"
    assert worker.returncode is None


async def test_readyz_follows_postgres_availability(deploy: Deploy, pg_admin_dsn: str) -> None:
    deployment, rows = await deploy(1)
    database = db.database_name(deployment.database_url)
    port = free_port()
    worker = start_worker(deployment, "readiness", health_settings(port))

    ready = await wait_for_status(port, "/readyz", 200, timeout_s=30)
    assert json.loads(ready.body)["failing"] == []
    passed = await run_cli_async("healthcheck", env=healthcheck_env(port))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "returned 200" in passed.stdout

    # Make the worker's database unreachable: new connections are refused
    # and the open ones, the pool's included, are closed.
    await rows.close()
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )

        not_ready = await wait_for_status(port, "/readyz", 503, timeout_s=20)
        body = json.loads(not_ready.body)
        assert body["failing"] == ["postgres"]
        assert body["checks"]["postgres"]["ok"] is False
        assert body["checks"]["joined"]["ok"] is True

        failed = await run_cli_async("healthcheck", env=healthcheck_env(port))
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "returned 503" in failed.stdout
        # Liveness does not depend on PostgreSQL: restarting the pod would not help.
        alive = await run_cli_async("healthcheck", "--path", "/healthz", env=healthcheck_env(port))
        assert alive.returncode == 0, alive.stdout + alive.stderr
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
        await admin.close()

    await wait_for_status(port, "/readyz", 200, timeout_s=20)
    assert worker.returncode is None

    # The worker still applies messages after the outage.
    reopened = await Rows.open(deployment)
    try:
        await deployment.produce([order_record("k-after")])
        await wait_for_positions(reopened, {0: 1}, timeout_s=30)
        assert await reopened.effects_per_key() == {"k-after": 1}
    finally:
        await reopened.close()


async def test_healthcheck_exit_codes_without_a_server() -> None:
    unset = await run_cli_async("healthcheck", env=healthcheck_env(None))
    assert unset.returncode == 2
    assert "CONSUMER_WORKER__HEALTH_PORT" in unset.stdout

    closed_port = free_port()
    no_server = await run_cli_async("healthcheck", env=healthcheck_env(closed_port))
    assert no_server.returncode == 1
    assert "ConnectionRefusedError" in no_server.stdout
    assert len(no_server.stdout.splitlines()) == 1


async def test_health_port_in_use_stops_worker(deploy: Deploy) -> None:
    deployment, _ = await deploy(1)
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        worker = start_worker(deployment, "port-taken", health_settings(port))
        exit_code = await wait_for_exit(worker, timeout_s=60)

    assert exit_code == 2, worker.output_tail()
    assert f"the health server cannot listen on 127.0.0.1:{port}" in worker.read_stderr()
    assert "CONSUMER_WORKER__HEALTH_PORT" in worker.read_stderr()
