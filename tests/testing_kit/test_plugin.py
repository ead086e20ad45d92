"""The pytest plugin as a user's suite loads it, and its registration in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from consumer.testing import plugin
from tests.support.process import REPO_ROOT

USER_CONFTEST = textwrap.dedent(
    """
    import pytest

    @pytest.fixture
    def anyio_backend():
        return "asyncio"
    """
)

USER_TESTS = textwrap.dedent(
    """
    import pytest

    from tests.testing_kit.handlers import COUNT_ENTRIES, LedgerHandler

    pytestmark = pytest.mark.anyio

    async def test_order_applied_once(consumer_harness):
        harness = consumer_harness(LedgerHandler)
        first, second = await harness.deliver_twice({"order_id": "o-1", "amount": 5})
        assert second.key_duplicates == 1
        await harness.assert_applied_once("o-1", effects=COUNT_ENTRIES)

    def test_servers_come_from_the_environment(consumer_broker, consumer_postgres):
        assert consumer_broker == "BOOTSTRAP"
        assert consumer_postgres == "ADMIN_DSN"
    """
)


@pytest.mark.integration
def test_plugin_runs_in_a_user_suite(tmp_path: Path, kafka_bootstrap: str, pg_admin_dsn: str) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(USER_CONFTEST)
    (tmp_path / "test_user.py").write_text(
        USER_TESTS.replace("BOOTSTRAP", kafka_bootstrap).replace("ADMIN_DSN", pg_admin_dsn)
    )
    environment = {name: value for name, value in os.environ.items() if not name.startswith("CONSUMER_")}
    environment.update(
        {
            # Only the plugins named with -p load, whatever else is installed.
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "PYTHONPATH": str(REPO_ROOT),
            plugin.KAFKA_BOOTSTRAP_VAR: kafka_bootstrap,
            plugin.DATABASE_URL_VAR: pg_admin_dsn,
        }
    )

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "anyio", "-p", "consumer.testing.plugin", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


@pytest.mark.unit
def test_pyproject_registers_the_plugin() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    entry_points = project.get("entry-points", {}).get("pytest11", {})
    assert entry_points.get("consumer") == "consumer.testing.plugin", (
        'pyproject.toml lacks [project.entry-points.pytest11] consumer = "consumer.testing.plugin"'
    )
    assert "testing" in project.get("optional-dependencies", {}), "pyproject.toml lacks the testing extra"
