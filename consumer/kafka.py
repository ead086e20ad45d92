"""Kafka clients built from the settings: consumer, producer and admin share one connection setup."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context

from consumer import errors
from consumer.settings import KafkaSettings

__all__ = ["admin", "connection_kwargs", "consumer", "producer"]


def connection_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Return the aiokafka arguments for brokers, TLS and SASL."""
    if not settings.bootstrap_servers:
        raise errors.ConfigurationError(
            "CONSUMER_KAFKA__BOOTSTRAP_SERVERS is missing; set it to the brokers, e.g. kafka-0:9092,kafka-1:9092"
        )
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        if settings.sasl_mechanism is None or settings.sasl_username is None or settings.sasl_password is None:
            raise errors.ConfigurationError(
                f"security_protocol {settings.security_protocol} needs CONSUMER_KAFKA__SASL_MECHANISM, "
                "CONSUMER_KAFKA__SASL_USERNAME and CONSUMER_KAFKA__SASL_PASSWORD"
            )
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise errors.ConfigurationError(
                f"CONSUMER_KAFKA__{name.upper()}={path} does not exist; mount the file or fix the path"
            )
    password = settings.ssl_key_password.get_secret_value() if settings.ssl_key_password else None
    context: ssl.SSLContext = create_ssl_context(
        cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
        certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        password=password,
    )
    return context


def consumer(settings: KafkaSettings, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    """Build a consumer that never commits on its own: the worker commits after PostgreSQL."""
    kwargs = connection_kwargs(settings)
    kwargs.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
        max_poll_interval_ms=int(settings.max_poll_interval_s * 1000),
        isolation_level=settings.isolation_level,
    )
    kwargs.update(overrides)
    return AIOKafkaConsumer(**kwargs)


def producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """Build a producer that waits for all in-sync replicas."""
    kwargs = connection_kwargs(settings)
    kwargs.update(acks="all")
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def admin(settings: KafkaSettings) -> AIOKafkaAdminClient:
    kwargs = connection_kwargs(settings)
    kwargs.pop("client_id", None)
    return AIOKafkaAdminClient(client_id=settings.client_id, **kwargs)
