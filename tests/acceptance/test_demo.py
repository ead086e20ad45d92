"""The README's demo, run as a user runs it, and redriving its dead letters after a fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import asyncpg
import pytest

from tests.support.process import REPO_ROOT

pytestmark = [pytest.mark.acceptance, pytest.mark.anyio, pytest.mark.timeout(300)]

UNIQUE_EVENTS = 435
BROKEN = 3


def run_cli(*args: str, database_url: str, timeout_s: float = 240.0) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CONSUMER_")}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args, "--database-url", database_url],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def test_demo_applies_each_event_once_and_redrives_broken_ones(kafka_bootstrap: str, database_url: str) -> None:
    demo = run_cli("demo", "--poison", str(BROKEN), "--bootstrap-servers", kafka_bootstrap, database_url=database_url)
    output = demo.stdout + demo.stderr

    assert demo.returncode == 0, output
    assert "FAIL" not in demo.stdout, demo.stdout
    assert "OK   effects equal the unique events" in demo.stdout
    assert "OK   dead letters equal the broken events" in demo.stdout
    assert "SIGKILL sent to the worker" in demo.stdout

    listed = run_cli("dead-letters", "list", "--schema", "consumer_demo", "--json", database_url=database_url)
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert len(letters) == BROKEN
    assert {letter["last_error_type"] for letter in letters} == {"KeyError"}
    assert {letter["status"] for letter in letters} == {"dead"}

    fixed = "tests.acceptance.demo_handlers:LenientQuakeHandler"
    arguments = ("dead-letters", "redrive", "--schema", "consumer_demo", "--handler", fixed, "--json")
    redriven = run_cli(*arguments, database_url=database_url)
    assert redriven.returncode == 0, redriven.stdout + redriven.stderr
    assert len(json.loads(redriven.stdout)["resolved"]) == BROKEN

    again = run_cli(*arguments, database_url=database_url)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["selected"] == 0

    connection = await asyncpg.connect(database_url)
    try:
        applied = await connection.fetch("SELECT event_id, count(*) AS n FROM quake_store.applied_events GROUP BY 1")
    finally:
        await connection.close()
    assert len(applied) == UNIQUE_EVENTS + BROKEN
    assert max(row["n"] for row in applied) == 1
