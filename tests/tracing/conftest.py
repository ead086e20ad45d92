"""Fixtures of the tracing tests: spans recorded in memory, a migrated database, and tracing made unavailable.

OpenTelemetry lets a process set the global tracer provider once. The
session installs a provider that hands out the SDK's tracer only while a test
uses the `spans` fixture, and the API's no-op tracer otherwise, so tests
elsewhere in the session run as if no SDK were configured.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from consumer import tracing
from tests.integration import helpers


class _Switch:
    """Whether the SDK records spans now."""

    on = False


def _switching_provider(sdk_provider: Any, switch: _Switch) -> Any:
    from opentelemetry import trace

    class SwitchingTracer(trace.Tracer):
        def __init__(self, recording: trace.Tracer) -> None:
            self._recording = recording
            self._off = trace.NoOpTracer()

        def _current(self) -> trace.Tracer:
            return self._recording if switch.on else self._off

        def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
            return self._current().start_span(*args, **kwargs)

        def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
            return self._current().start_as_current_span(*args, **kwargs)

    class SwitchingProvider(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return SwitchingTracer(sdk_provider.get_tracer(*args, **kwargs))

    return SwitchingProvider()


@pytest.fixture(scope="session")
def _recording_provider() -> Iterator[tuple[Any, _Switch]]:
    """The in-memory exporter behind the global tracer provider, and the switch that turns recording on."""
    pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing tests need opentelemetry-sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    sdk_provider = TracerProvider()
    sdk_provider.add_span_processor(SimpleSpanProcessor(exporter))
    switch = _Switch()
    provider = _switching_provider(sdk_provider, switch)
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another global tracer provider was set earlier in this session")
    yield exporter, switch
    sdk_provider.shutdown()


@pytest.fixture
def spans(_recording_provider: tuple[Any, _Switch]) -> Iterator[Any]:
    """An `InMemorySpanExporter` that receives every span ended during the test."""
    exporter, switch = _recording_provider
    exporter.clear()
    switch.on = True
    try:
        yield exporter
    finally:
        switch.on = False
        exporter.clear()


@pytest.fixture
def tracing_unavailable() -> Iterator[ModuleType]:
    """`consumer.tracing` imported again as if opentelemetry-api were not installed; restored afterwards."""
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in [name for name in sys.modules if name.startswith("opentelemetry.")]:
                patch.setitem(sys.modules, name, None)
            # None in sys.modules makes every import of the package raise ImportError.
            patch.setitem(sys.modules, "opentelemetry", None)
            yield importlib.reload(tracing)
    finally:
        importlib.reload(tracing)


@pytest.fixture
async def migrated_database(database_url: str) -> str:
    """URL of a fresh database with the framework's and the test handlers' tables."""
    await helpers.migrate(database_url)
    return database_url


@pytest.fixture
async def rows(migrated_database: str) -> AsyncIterator[helpers.Rows]:
    """A `helpers.Rows` reader on its own connection to `migrated_database`."""
    connection = await asyncpg.connect(migrated_database)
    try:
        yield helpers.Rows(connection)
    finally:
        await connection.close()
