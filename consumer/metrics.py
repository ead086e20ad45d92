"""Prometheus metrics of one worker.

Every metric lives in the worker's own `CollectorRegistry`, so several
workers in one process (tests, embedded use) do not collide. Labels are
bounded: group, topic, partition, cause, reason and kind, never keys or
offsets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class Metrics:
    """The worker's counters, gauges and histograms."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.messages_processed = Counter(
            "consumer_messages_processed",
            "Messages whose handler effects were committed.",
            ["group", "topic"],
            registry=registry,
        )
        self.duplicates_skipped = Counter(
            "consumer_duplicates_skipped",
            "Messages skipped as duplicates, by cause: position (redelivered offset), key (idempotency key "
            "already applied), fenced (another worker advanced the partition first), replay (during a replay).",
            ["group", "topic", "cause"],
            registry=registry,
        )
        self.key_conflicts = Counter(
            "consumer_key_conflicts",
            "Messages whose idempotency key was already applied with a different payload.",
            ["group", "topic"],
            registry=registry,
        )
        self.retries = Counter(
            "consumer_retries",
            "Retries scheduled, by kind: handler (a failed attempt) or infrastructure (a failed batch transaction).",
            ["group", "topic", "kind"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "consumer_dead_letters",
            "Messages written to the dead-letter table, by reason.",
            ["group", "topic", "reason"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "consumer_handler_duration_seconds",
            "Duration of one handler call.",
            ["group", "topic"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.transaction_duration = Histogram(
            "consumer_batch_transaction_duration_seconds",
            "Duration of one batch transaction, from BEGIN to COMMIT.",
            ["group", "topic"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "consumer_batch_size_messages",
            "Messages per batch transaction.",
            ["group", "topic"],
            buckets=_BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "consumer_partition_lag_messages",
            "Broker end offset minus the stored position, per assigned partition.",
            ["group", "topic", "partition"],
            registry=registry,
        )
        self.rebalances = Counter(
            "consumer_rebalances", "Partition assignments received.", ["group"], registry=registry
        )
        self.assigned_partitions = Gauge(
            "consumer_assigned_partitions", "Partitions assigned to this worker.", ["group"], registry=registry
        )
        self.halted_partitions = Gauge(
            "consumer_halted_partitions",
            "Assigned partitions that cannot advance (repeated transaction or dead-letter write failures).",
            ["group"],
            registry=registry,
        )
        self.inbox_rows = Gauge(
            "consumer_inbox_rows",
            "Dedup records kept for the dedup scope, counted once a minute.",
            ["group"],
            registry=registry,
        )
        self.outbox_backlog = Gauge(
            "consumer_outbox_backlog_messages",
            "Published messages of the dedup scope not yet sent by the relay, counted once a minute.",
            ["group"],
            registry=registry,
        )
        self.offsets_lost = Counter(
            "consumer_offsets_lost",
            "Messages deleted by the broker before they were applied (retention or delete-records).",
            ["group", "topic", "partition"],
            registry=registry,
        )

    def exposition(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)
