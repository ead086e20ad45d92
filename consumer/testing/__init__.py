"""Test kit for handlers: run them through the real inbox transaction, inject faults, assert effects once.

Install it with the ``testing`` extra, which also registers the pytest
plugin (`consumer.testing.plugin`) and its ``consumer_*`` fixtures::

    async def test_order_applied_once(consumer_harness):
        harness = consumer_harness(OrderHandler)
        first, second = await harness.deliver_twice({"order_id": "o-1", "amount": 5})
        assert second.key_duplicates == 1
        await harness.assert_applied_once(
            "o-1", effects="SELECT count(*) FROM ledger WHERE order_id = $1"
        )

`InboxHarness` needs only PostgreSQL. `WorkerScenario` runs real workers
against a broker for the faults that involve Kafka. docs/testing.md has a
worked example.
"""

from consumer.testing.databases import DatabaseFactory, migrate
from consumer.testing.harness import Delivery, InboxHarness
from consumer.testing.scenarios import CrashReport, Record, WorkerScenario
from consumer.testing.state import InboxState

__all__ = [
    "CrashReport",
    "DatabaseFactory",
    "Delivery",
    "InboxHarness",
    "InboxState",
    "Record",
    "WorkerScenario",
    "migrate",
]
