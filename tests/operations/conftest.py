"""Fixtures of the operations tests: a migrated deployment whose worker serves the health port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.acceptance.helpers import Deployment, Rows
from tests.support.process import WorkerProcess


@pytest.fixture
async def deploy(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    database_url: str,
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> AsyncIterator[Callable[[int], Awaitable[tuple[Deployment, Rows]]]]:
    """Callable ``(partitions) -> (deployment, rows)``: a new topic and group over the migrated test database."""
    opened: list[Rows] = []

    async def make(partitions: int = 1) -> tuple[Deployment, Rows]:
        topic = topic_factory(partitions, prefix="operations")
        deployment = Deployment(
            bootstrap=kafka_bootstrap,
            topic=topic,
            database_url=database_url,
            start_process=worker_factory,
            log_dir=tmp_path,
        )
        await deployment.migrate()
        rows = await Rows.open(deployment)
        opened.append(rows)
        return deployment, rows

    yield make
    for rows in opened:
        await rows.close()
