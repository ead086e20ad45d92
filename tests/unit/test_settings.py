"""Unit tests of consumer.settings: list syntax, errors that name the variable, and secret masking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consumer import errors, settings

pytestmark = pytest.mark.unit

# Made-up passwords that must never show up in output or error messages.
DSN_PASSWORD = "S3cr3t-canary-42"  # noqa: S105
SASL_PASSWORD = "K4fka-canary-77"  # noqa: S105


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop every CONSUMER_* variable and leave the working directory, so no shell setting or .env file leaks in."""
    for name in list(os.environ):
        if name.startswith("CONSUMER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def load_error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(errors.ConfigurationError) as raised:
        settings.load()
    return str(raised.value)


@pytest.mark.parametrize(
    "value",
    ["k0:9092,k1:9093", " k0:9092 , k1:9093 ", '["k0:9092", "k1:9093"]', '  ["k0:9092","k1:9093"]'],
)
def test_bootstrap_servers_comma_and_json_alike(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CONSUMER_KAFKA__BOOTSTRAP_SERVERS", value)

    assert settings.load().kafka.bootstrap_servers == ["k0:9092", "k1:9093"]


@pytest.mark.parametrize("value", ["orders,refunds", "orders, refunds,", '["orders", "refunds"]'])
def test_topics_comma_and_json_alike(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CONSUMER_KAFKA__TOPICS", value)

    assert settings.load().kafka.topics == ["orders", "refunds"]


def test_single_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUMER_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("CONSUMER_KAFKA__TOPICS", "orders")

    loaded = settings.load()

    assert loaded.kafka.bootstrap_servers == ["kafka:9092"]
    assert loaded.kafka.topics == ["orders"]


def test_topics_unset_is_none() -> None:
    assert settings.load().kafka.topics is None


@pytest.mark.parametrize("value", ["", " ", ",", "[]"])
def test_empty_topics_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = load_error(monkeypatch, CONSUMER_KAFKA__TOPICS=value)

    assert "CONSUMER_KAFKA__TOPICS" in message
    assert "at least one topic" in message


def test_bootstrap_server_without_port_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(monkeypatch, CONSUMER_KAFKA__BOOTSTRAP_SERVERS="kafka-0:9092,kafka-1")

    assert "CONSUMER_KAFKA__BOOTSTRAP_SERVERS" in message
    assert "host:port" in message


def test_malformed_json_list_rejected_without_value(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(monkeypatch, CONSUMER_KAFKA__BOOTSTRAP_SERVERS=f'["k0:9092", "{SASL_PASSWORD}"')

    assert SASL_PASSWORD not in message


def test_invalid_number_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(monkeypatch, CONSUMER_WORKER__MAX_ATTEMPTS="0")

    assert "CONSUMER_WORKER__MAX_ATTEMPTS" in message


def test_invalid_dsn_port_rejected_without_password(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(monkeypatch, CONSUMER_POSTGRES__DSN=f"postgresql://app:{DSN_PASSWORD}@db:99999/orders")

    assert "CONSUMER_POSTGRES__DSN" in message
    assert DSN_PASSWORD not in message


def test_dsn_with_other_scheme_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(monkeypatch, CONSUMER_POSTGRES__DSN=f"mysql://app:{DSN_PASSWORD}@db:3306/orders")

    assert "postgresql://" in message
    assert DSN_PASSWORD not in message


def test_dsn_from_secrets_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres__dsn").write_text(f"postgresql://app:{DSN_PASSWORD}@db:5432/orders")
    monkeypatch.setenv("CONSUMER_SECRETS_DIR", str(secrets))

    loaded = settings.load()

    assert loaded.postgres.dsn is not None
    assert loaded.postgres.dsn.get_secret_value() == f"postgresql://app:{DSN_PASSWORD}@db:5432/orders"
    assert DSN_PASSWORD not in repr(loaded)


def test_secrets_dir_missing_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = load_error(monkeypatch, CONSUMER_SECRETS_DIR=str(tmp_path / "absent"))

    assert "CONSUMER_SECRETS_DIR" in message


def test_redacted_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUMER_POSTGRES__DSN", f"postgresql://app:{DSN_PASSWORD}@db:5432/orders?sslmode=require")
    monkeypatch.setenv("CONSUMER_KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("CONSUMER_KAFKA__SSL_KEY_PASSWORD", SASL_PASSWORD)

    redacted = settings.load().redacted()

    assert redacted["postgres"]["dsn"] == "postgresql://app:***@db:5432/orders?sslmode=require"
    assert redacted["kafka"]["sasl_password"] == "***"  # noqa: S105 - the mask, not a password
    assert redacted["kafka"]["ssl_key_password"] == "***"  # noqa: S105 - the mask, not a password
    assert DSN_PASSWORD not in repr(redacted)
    assert SASL_PASSWORD not in repr(redacted)


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://app:pw@db:5432/orders", "postgresql://app:***@db:5432/orders"),
        ("postgresql://app:pw@db/orders", "postgresql://app:***@db/orders"),
        ("postgresql://app@db:5432/orders", "postgresql://app@db:5432/orders"),
        ("postgresql://app:p%40ss@db/orders?sslmode=require", "postgresql://app:***@db/orders?sslmode=require"),
        ("postgresql://app:pw@[::1]:5432/orders", "postgresql://app:***@[::1]:5432/orders"),
        ("postgresql://app:pw@db:99999/orders", "postgresql://app:***@db:99999/orders"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert settings.mask_dsn(dsn) == masked


def test_env_var_names() -> None:
    names = settings.env_var_names()

    assert names["kafka.bootstrap_servers"] == "CONSUMER_KAFKA__BOOTSTRAP_SERVERS"
    assert names["kafka.topics"] == "CONSUMER_KAFKA__TOPICS"
    assert names["postgres.schema"] == "CONSUMER_POSTGRES__SCHEMA"
    assert names["postgres.dsn"] == "CONSUMER_POSTGRES__DSN"
    assert names["dedup_scope"] == "CONSUMER_DEDUP_SCOPE"
