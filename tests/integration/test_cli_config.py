"""Settings as the ``consumer`` command reads them: list syntax, invalid values, and secrets kept out of the output.

Each test runs ``python -m consumer`` as a subprocess with a controlled
environment and checks the exit code, stdout and stderr.
"""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.integration import helpers

pytestmark = pytest.mark.integration

# Made-up passwords that must never show up in output or error messages.
DSN_PASSWORD = "S3cr3t-canary-42"  # noqa: S105
SASL_PASSWORD = "K4fka-canary-77"  # noqa: S105
HANDLER = "tests.support.handlers:OrderHandler"

SASL_ENV = {
    "CONSUMER_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "CONSUMER_KAFKA__SASL_MECHANISM": "PLAIN",
    "CONSUMER_KAFKA__SASL_USERNAME": "app",
    "CONSUMER_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
}


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    for secret in (DSN_PASSWORD, SASL_PASSWORD):
        assert secret not in result.stdout, f"{secret} in stdout:\n{result.stdout}"
        assert secret not in result.stderr, f"{secret} in stderr:\n{result.stderr}"


def effective_settings(env: dict[str, str]) -> dict[str, object]:
    result = helpers.run_cli("config", env=env)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("variable", "comma", "json_list", "expected"),
    [
        ("CONSUMER_KAFKA__BOOTSTRAP_SERVERS", "k0:9092, k1:9093", '["k0:9092", "k1:9093"]', ["k0:9092", "k1:9093"]),
        ("CONSUMER_KAFKA__TOPICS", "orders,refunds", '["orders","refunds"]', ["orders", "refunds"]),
    ],
)
def test_comma_and_json_lists_parse_alike(variable: str, comma: str, json_list: str, expected: list[str]) -> None:
    field = variable.removeprefix("CONSUMER_KAFKA__").lower()

    from_comma = effective_settings({variable: comma})
    from_json = effective_settings({variable: json_list})
    single = effective_settings({variable: expected[0]})

    assert from_comma == from_json
    assert from_comma["kafka"][field] == expected  # type: ignore[index]
    assert single["kafka"][field] == expected[:1]  # type: ignore[index]


def test_empty_topics_rejected_without_traceback() -> None:
    result = helpers.run_cli("config", env={"CONSUMER_KAFKA__TOPICS": ""})

    assert result.returncode == 2
    assert "CONSUMER_KAFKA__TOPICS" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_config_masks_secrets() -> None:
    dsn = f"postgresql://app:{DSN_PASSWORD}@db.internal:5432/orders"

    result = helpers.run_cli("config", env={"CONSUMER_POSTGRES__DSN": dsn, **SASL_ENV})

    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    redacted = json.loads(result.stdout)
    assert redacted["postgres"]["dsn"] == "postgresql://app:***@db.internal:5432/orders"
    assert redacted["kafka"]["sasl_password"] == "***"  # noqa: S105 - the mask, not a password
    assert redacted["kafka"]["sasl_username"] == "app"


def test_config_masks_dsn_from_secrets_dir(tmp_path: Path) -> None:
    (tmp_path / "postgres__dsn").write_text(f"postgresql://app:{DSN_PASSWORD}@db.internal:5432/orders")

    result = helpers.run_cli("config", env={"CONSUMER_SECRETS_DIR": str(tmp_path), **SASL_ENV})

    assert result.returncode == 0, result.stderr
    assert_no_secret(result)
    assert json.loads(result.stdout)["postgres"]["dsn"] == "postgresql://app:***@db.internal:5432/orders"


@pytest.mark.parametrize(
    "command", [["config"], ["run", HANDLER], ["-v", "run", HANDLER]], ids=["config", "run", "run-v"]
)
@pytest.mark.parametrize("source", ["env", "secrets_dir"])
def test_invalid_dsn_port_rejected_without_secret(command: list[str], source: str, tmp_path: Path) -> None:
    dsn = f"postgresql://app:{DSN_PASSWORD}@127.0.0.1:99999/orders"
    env = dict(SASL_ENV)
    if source == "env":
        env["CONSUMER_POSTGRES__DSN"] = dsn
    else:
        (tmp_path / "postgres__dsn").write_text(dsn)
        env["CONSUMER_SECRETS_DIR"] = str(tmp_path)
    arguments = _with_verbose_last(command)

    result = helpers.run_cli(*arguments, env=env)

    assert_no_secret(result)
    assert result.returncode == 2, result.stderr
    assert "CONSUMER_POSTGRES__DSN" in result.stderr


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_unreachable_database_reported_without_secret(verbose: bool) -> None:
    dsn = f"postgresql://app:{DSN_PASSWORD}@127.0.0.1:{unused_port()}/orders"
    arguments = ["run", HANDLER, *(["-v"] if verbose else [])]

    result = helpers.run_cli(*arguments, env={"CONSUMER_POSTGRES__DSN": dsn, **SASL_ENV})

    assert_no_secret(result)
    assert result.returncode == 3, result.stderr
    assert "postgresql://app:***@127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr or verbose


@pytest.fixture
async def canary_role_url(database_url: str) -> AsyncIterator[str]:
    """URL of `database_url` for a new login role whose password is DSN_PASSWORD."""
    role = f"canary_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{DSN_PASSWORD}'")
    finally:
        await admin.close()
    yield helpers.url_with_user(database_url, role, DSN_PASSWORD)
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["env", "secrets_dir"])
@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
async def test_run_without_bootstrap_servers_fails_without_secret(
    canary_role_url: str, source: str, verbose: bool, tmp_path: Path
) -> None:
    env = dict(SASL_ENV)
    if source == "env":
        env["CONSUMER_POSTGRES__DSN"] = canary_role_url
    else:
        (tmp_path / "postgres__dsn").write_text(canary_role_url)
        env["CONSUMER_SECRETS_DIR"] = str(tmp_path)
    arguments = ["run", HANDLER, *(["-v"] if verbose else [])]

    result = helpers.run_cli(*arguments, env=env)

    assert_no_secret(result)
    assert result.returncode == 2, result.stderr
    assert "CONSUMER_KAFKA__BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr or verbose


def _with_verbose_last(command: list[str]) -> list[str]:
    """Move a leading ``-v`` behind the subcommand, where the parser accepts it."""
    if command[0] == "-v":
        return [*command[1:], "-v"]
    return command
