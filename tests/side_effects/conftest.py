"""Fixtures of the side-effect tests: the scoring service, and the lead example deployed on fresh topics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio.from_thread
import pytest

from examples.leads.scoring_service import ScoringService
from tests.side_effects.helpers import LeadRows, LeadsDeployment
from tests.support.process import WorkerProcess


@pytest.fixture
def scoring_service() -> Iterator[ScoringService]:
    """A `ScoringService` listening on 127.0.0.1 at a free port, on an event loop in a thread of its own.

    Its own loop keeps it answering while a test blocks, for example in
    `WorkerProcess.wait`. Tests read and set its fields directly.
    """
    service = ScoringService()
    with anyio.from_thread.start_blocking_portal() as portal:
        serving, _port = portal.start_task(service.serve)
        yield service
        serving.cancel()


@pytest.fixture
async def leads(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    database_url: str,
    worker_factory: Callable[..., WorkerProcess],
    scoring_service: ScoringService,
    tmp_path: Path,
) -> AsyncIterator[tuple[LeadsDeployment, LeadRows]]:
    """The lead example on fresh one-partition topics over a migrated database, and a reader of its rows."""
    deployment = LeadsDeployment(
        bootstrap=kafka_bootstrap,
        database_url=database_url,
        leads_topic=topic_factory(1, prefix="leads"),
        scored_topic=topic_factory(1, prefix="lead-scored"),
        dead_letter_topic=topic_factory(1, prefix="leads-dlt"),
        service=scoring_service,
        start_process=worker_factory,
        log_dir=tmp_path,
    )
    await deployment.migrate()
    rows = await LeadRows.open(deployment)
    try:
        yield deployment, rows
    finally:
        await rows.close()
