"""One settings object for the worker, the CLI and the demo.

Every field is read from the environment with the prefix ``CONSUMER_`` and
``__`` between a group and its field, for example
``CONSUMER_KAFKA__BOOTSTRAP_SERVERS`` or ``CONSUMER_POSTGRES__DSN``. A ``.env``
file in the working directory is read too. Secrets can also come from files:
point ``CONSUMER_SECRETS_DIR`` at a folder holding one file per variable, named
like the variable without the prefix in lower case (``postgres__dsn``), as a
Kubernetes secret mount does.

List fields accept a comma-separated string (``a:9092,b:9092``) or a JSON list.
Durations are in seconds and end in ``_s``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from consumer import errors

__all__ = [
    "ENV_PREFIX",
    "KafkaSettings",
    "LogSettings",
    "PostgresSettings",
    "Settings",
    "WorkerSettings",
    "env_var_names",
    "load",
    "mask_dsn",
]

ENV_PREFIX = "CONSUMER_"
NESTED_DELIMITER = "__"
SECRETS_DIR_VAR = "CONSUMER_SECRETS_DIR"

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _split_list(value: Any) -> Any:
    """Accept ``a,b``, ``["a","b"]`` or a list; strip blanks around each item."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class KafkaSettings(BaseModel):
    """Connection to the Kafka cluster and the consumer group's timing."""

    bootstrap_servers: CommaList = Field(
        default_factory=list,
        description="Kafka brokers as host:port, comma-separated.",
    )
    topics: CommaList | None = Field(
        default=None,
        description="Topics to consume; overrides the handler's own list when set.",
    )
    group_id: str | None = Field(
        default=None,
        description="Consumer group id; overrides the handler's group_id when set.",
    )
    client_id: str = Field(default="consumer", description="Client id sent to the brokers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How to connect to the brokers."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism for SASL_PLAINTEXT and SASL_SSL."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle that signs the brokers' certificates.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(default=None, description="Private key of the client certificate.")
    ssl_key_password: SecretStr | None = Field(default=None, description="Password of the private key file.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description=(
            "Where a partition starts when neither PostgreSQL nor Kafka has a position for it. "
            "earliest reads the whole retained log, so no retained message is skipped."
        ),
    )
    session_timeout_s: float = Field(default=45.0, gt=0, description="Group session timeout, in seconds.")
    heartbeat_interval_s: float = Field(default=3.0, gt=0, description="Heartbeat interval, in seconds.")
    max_poll_interval_s: float = Field(
        default=300.0, gt=0, description="Maximum time between two polls before the member is evicted, in seconds."
    )
    request_timeout_s: float = Field(default=40.0, gt=0, description="Broker request timeout, in seconds.")
    fetch_max_records: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Maximum records returned by one poll. Unset, a poll takes every record the client has prefetched: "
            "at most one fetch response per partition."
        ),
    )
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        default="read_committed",
        description="read_committed hides messages of aborted producer transactions.",
    )

    @field_validator("bootstrap_servers", "topics", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("topics")
    @classmethod
    def _topics_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must list at least one topic; unset it to use the handler's topics")
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers_have_ports(cls, value: list[str]) -> list[str]:
        for server in value:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port; write it like kafka-0:9092")
        return value


class PostgresSettings(BaseModel):
    """Connection to the PostgreSQL database that stores effects, dedup records and positions."""

    dsn: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL, e.g. postgresql://user:password@host:5432/db?sslmode=require.",
    )
    schema_name: str = Field(
        default="consumer",
        alias="schema",
        description="Schema that contains the framework's tables.",
    )
    pool_min_size: int = Field(default=1, ge=0, description="Connections kept open.")
    pool_max_size: int = Field(default=10, ge=1, description="Maximum connections in the pool.")
    application_name: str = Field(default="consumer", description="application_name shown in pg_stat_activity.")
    statement_cache_size: int = Field(
        default=100, ge=0, description="Prepared statements cached per connection; 0 for pgbouncer in transaction mode."
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Timeout for opening a connection, in seconds.")

    model_config = {"populate_by_name": True}

    @field_validator("schema_name")
    @classmethod
    def _schema_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a plain lower-case SQL identifier; use letters, digits and underscores")
        return value

    @field_validator("dsn")
    @classmethod
    def _dsn_is_postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value.get_secret_value())
            port = parts.port
        except ValueError:
            raise ValueError("is not a valid URL; write it like postgresql://user:password@host:5432/db") from None
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("must start with postgresql://")
        del port
        return value


class WorkerSettings(BaseModel):
    """Batching, retry and shutdown settings of the worker."""

    max_batch_size: int = Field(default=500, ge=1, description="Maximum messages applied in one transaction.")
    poll_timeout_s: float = Field(default=0.2, gt=0, description="How long one poll waits for records, in seconds.")
    shutdown_timeout_s: float = Field(
        default=25.0,
        gt=0,
        description=(
            "On SIGTERM, how long in-flight messages may run before they are cancelled and rolled back, in seconds. "
            "Keep it below the pod's terminationGracePeriodSeconds."
        ),
    )
    revoke_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "On a rebalance, how long a revoked partition's in-flight message may run "
            "before it is cancelled and rolled back, in seconds."
        ),
    )
    handler_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Time limit for one handler call, in seconds; a timeout counts as a failed attempt.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Handler attempts before a message is dead-lettered.")
    retry_backoff_s: float = Field(
        default=0.5, ge=0, description="First retry delay, in seconds; doubles each attempt."
    )
    retry_backoff_max_s: float = Field(default=30.0, ge=0, description="Upper bound of the retry delay, in seconds.")
    max_buffered_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description=(
            "Fetched key and value bytes a worker holds before it pauses fetching, in bytes (default 64 MiB). "
            "Each partition also stops fetching while two batches wait."
        ),
    )
    kafka_commit_interval_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "How often stored positions are copied to Kafka's committed offsets, in seconds. "
            "PostgreSQL is the source of truth; Kafka's copy serves lag tools."
        ),
    )
    inbox_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description=(
            "How long dedup records of idempotency keys are kept, in seconds (default 7 days). "
            "A copy of a key arriving later than this is applied again; positions never expire."
        ),
    )
    prune_interval_s: float = Field(
        default=300.0, gt=0, description="How often the worker deletes expired dedup records, in seconds."
    )
    prune_batch_size: int = Field(default=1000, ge=1, description="Dedup records deleted per pruning transaction.")
    on_offsets_lost: Literal["continue", "stop"] = Field(
        default="continue",
        description=(
            "When the stored position is below the log start (the broker deleted unapplied messages): "
            "continue from the log start after an ERROR log and a metric, or stop the worker."
        ),
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description="Port of the HTTP health and metrics server; unset to turn it off."
    )
    health_host: str = Field(default="0.0.0.0", description="Address the health and metrics server binds to.")  # noqa: S104


class LogSettings(BaseModel):
    """Log level and format, applied by the CLI only."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    format: Literal["text", "json"] = Field(default="text", description="text for people, json for log pipelines.")


class Settings(BaseSettings):
    """All settings, grouped by the part of the system they configure."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # Secret files are named like the variables without the prefix, in
        # lower case: postgres__dsn, kafka__sasl_password.
        secrets_nested_delimiter=NESTED_DELIMITER,
        secrets_prefix="",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    dedup_scope: str | None = Field(
        default=None,
        description=(
            "Name under which dedup records and positions are kept; defaults to the group id. "
            "Two deployments with the same scope never apply the same message twice."
        ),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The nested source maps a secret file `postgres__dsn` to postgres.dsn.
        return init_settings, env_settings, dotenv_settings, NestedSecretsSettingsSource(file_secret_settings)

    def redacted(self) -> dict[str, Any]:
        """Return the settings as plain data with every secret masked, for `config show` and logs."""
        data = self.model_dump(mode="json", by_alias=True)
        dsn = self.postgres.dsn
        data["postgres"]["dsn"] = mask_dsn(dsn.get_secret_value()) if dsn else None
        for name in ("sasl_password", "ssl_key_password"):
            if data["kafka"][name] is not None:
                data["kafka"][name] = "***"
        return data


def mask_dsn(dsn: str) -> str:
    """Replace the password in a PostgreSQL URL with ``***``."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "***"
    userinfo, at, host_and_port = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return dsn
    # Work on the raw netloc so brackets of an IPv6 host and an invalid
    # port survive as written.
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{host_and_port}", parts.path, parts.query, parts.fragment))


def env_var_names() -> dict[str, str]:
    """Map every dotted settings path (``kafka.topics``) to its environment variable."""
    names: dict[str, str] = {}
    for group_name, group_field in Settings.model_fields.items():
        model = group_field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for field_name, field in model.model_fields.items():
                env_name = field.alias or field_name
                names[f"{group_name}.{env_name}"] = (
                    f"{ENV_PREFIX}{group_name.upper()}{NESTED_DELIMITER}{env_name.upper()}"
                )
        else:
            names[group_name] = f"{ENV_PREFIX}{group_name.upper()}"
    return names


def load(**overrides: Any) -> Settings:
    """Read the settings from the environment, `.env` and the secrets folder.

    Raises `errors.ConfigurationError` naming each invalid variable. The
    message never contains the rejected value, because it may be a secret.
    """
    secrets_dir = os.environ.get(SECRETS_DIR_VAR)
    kwargs: dict[str, Any] = dict(overrides)
    if secrets_dir:
        if not Path(secrets_dir).is_dir():
            raise errors.ConfigurationError(
                f"{SECRETS_DIR_VAR}={secrets_dir} is not a directory; point it at the mounted secrets folder"
            )
        kwargs["_secrets_dir"] = secrets_dir
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        raise errors.ConfigurationError(_describe(exc)) from None
    except ValueError as exc:
        # pydantic-settings raises a plain ValueError when a JSON list does not
        # parse; its text quotes the value, which may be a secret, so drop it.
        raise errors.ConfigurationError(
            f"a setting could not be parsed ({type(exc).__name__}); check the JSON or comma-separated lists"
        ) from None


def _describe(exc: ValidationError) -> str:
    """Build an error message that names each variable and omits its value."""
    names = env_var_names()
    lines = ["invalid settings:"]
    for error in exc.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        env_name = names.get(location, ENV_PREFIX + location.upper().replace(".", NESTED_DELIMITER))
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {env_name} ({location}): {message}")
    return "\n".join(lines)
