"""``consumer status`` against a database that a ``consumer run`` subprocess filled, with and without the broker."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest

from tests.acceptance.helpers import ASSIGNED_LINE, Deployment, Rows, order_record, wait_for_output, wait_for_positions
from tests.operations.helpers import free_port, run_cli_async, start_worker
from tests.support import kafka

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio]

Deploy = Callable[[int], Awaitable[tuple[Deployment, Rows]]]


def cli_env(deployment: Deployment, bootstrap: str | None = None) -> dict[str, str]:
    env = {"CONSUMER_POSTGRES__DSN": deployment.database_url}
    env["CONSUMER_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap or deployment.bootstrap
    return env


async def fill(deployment: Deployment, rows: Rows) -> None:
    """Apply, on two partitions, five orders, one producer duplicate and one message that is not JSON."""
    worker = start_worker(deployment, "status")
    await wait_for_output(worker, ASSIGNED_LINE, timeout_s=30)
    poison = kafka.Record(partition=1, key=b"bad", value=b"not json", headers=[("Idempotency-Key", b"k-bad")])
    await deployment.produce(
        [
            order_record("k-1", partition=0),
            order_record("k-2", partition=0),
            order_record("k-1", partition=0),
            order_record("k-3", partition=1),
            poison,
            order_record("k-4", partition=1),
            order_record("k-5", partition=1),
        ]
    )
    await wait_for_positions(rows, {0: 3, 1: 4}, timeout_s=30)


async def test_status_json_matches_positions_table(deploy: Deploy) -> None:
    deployment, rows = await deploy(2)
    await fill(deployment, rows)

    result = await run_cli_async("status", "--json", env=cli_env(deployment))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)

    stored = await rows.connection.fetch(
        "SELECT p.*, (SELECT count(*) FROM consumer.dead_letters AS d WHERE d.dedup_scope = p.dedup_scope"
        " AND d.topic = p.topic AND d.partition = p.partition AND d.status = 'dead') AS dead"
        " FROM consumer.positions AS p ORDER BY partition"
    )
    assert report["broker"] == {"status": "ok", "detail": None}
    assert len(report["partitions"]) == len(stored) == 2
    for reported, row in zip(report["partitions"], stored, strict=True):
        assert reported["dedup_scope"] == row["dedup_scope"] == deployment.group_id
        assert reported["topic"] == row["topic"] == deployment.topic
        assert reported["partition"] == row["partition"]
        assert reported["group_id"] == row["group_id"]
        assert reported["next_offset"] == row["next_offset"]
        assert reported["applied"] == row["applied"]
        assert reported["key_duplicates"] == row["key_duplicates"]
        assert reported["position_duplicates"] == row["position_duplicates"]
        assert reported["dead_lettered"] == row["dead_lettered"]
        assert reported["dead_letters_dead"] == row["dead"]
        assert datetime.fromisoformat(reported["last_processed_at"]) == row["updated_at"]
        # Every produced message was applied, so the end offset is the position and the lag is zero.
        assert reported["end_offset"] == row["next_offset"]
        assert reported["lag"] == 0

    by_partition = {entry["partition"]: entry for entry in report["partitions"]}
    assert by_partition[0]["applied"] == 2
    assert by_partition[0]["key_duplicates"] == 1
    assert by_partition[1]["applied"] == 3
    assert by_partition[1]["dead_lettered"] == 1
    assert by_partition[1]["dead_letters_dead"] == 1


async def test_status_group_filter_and_table(deploy: Deploy) -> None:
    deployment, rows = await deploy(2)
    await fill(deployment, rows)

    other = await run_cli_async("status", "--json", "--group", "no-such-scope", env=cli_env(deployment))
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["partitions"] == []

    table = await run_cli_async("status", "--group", deployment.group_id, env=cli_env(deployment))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"dedup scope {deployment.group_id}"
    assert lines[1].split()[:5] == ["TOPIC", "PARTITION", "POSITION", "END", "LAG"]
    first, second = lines[2].split(), lines[3].split()
    assert first[:5] == [deployment.topic, "0", "3", "3", "0"]
    assert second[:5] == [deployment.topic, "1", "4", "4", "0"]
    # APPLIED, DUPLICATES, DEAD-LETTERED and DEAD NOW close each row.
    assert first[-4:] == ["2", "1", "0", "0"]
    assert second[-4:] == ["3", "0", "1", "1"]
    assert "unknown" not in table.stdout


async def test_status_without_broker_shows_unknown_end_offsets(deploy: Deploy) -> None:
    deployment, rows = await deploy(2)
    await fill(deployment, rows)

    skipped = await run_cli_async("status", "--json", "--no-broker", env=cli_env(deployment))
    assert skipped.returncode == 0, skipped.stderr
    report = json.loads(skipped.stdout)
    assert report["broker"]["status"] == "skipped"
    assert [entry["end_offset"] for entry in report["partitions"]] == [None, None]
    assert [entry["lag"] for entry in report["partitions"]] == [None, None]
    assert [entry["next_offset"] for entry in report["partitions"]] == [3, 4]

    closed = f"127.0.0.1:{free_port()}"
    unreachable = await run_cli_async("status", "--broker-timeout", "5", env=cli_env(deployment, bootstrap=closed))
    assert unreachable.returncode == 0, unreachable.stderr
    assert "end offsets and lag unknown: the broker at" in unreachable.stdout
    rows_of_table = [line.split() for line in unreachable.stdout.splitlines()[2:4]]
    assert [row[3:5] for row in rows_of_table] == [["?", "?"], ["?", "?"]]

    unset = await run_cli_async("status", "--json", env={"CONSUMER_POSTGRES__DSN": deployment.database_url})
    assert unset.returncode == 0, unset.stderr
    assert json.loads(unset.stdout)["broker"] == {
        "status": "not_configured",
        "detail": "CONSUMER_KAFKA__BOOTSTRAP_SERVERS is not set",
    }


async def test_status_reports_missing_schema_and_database(database_url: str) -> None:
    unmigrated = await run_cli_async("status", "--no-broker", env={"CONSUMER_POSTGRES__DSN": database_url})
    assert unmigrated.returncode == 1
    assert "run `consumer migrate`" in unmigrated.stderr

    closed = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/nothing"
    unreachable = await run_cli_async("status", "--no-broker", env={"CONSUMER_POSTGRES__DSN": closed})
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("error: cannot connect to PostgreSQL")
