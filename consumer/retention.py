"""Dedup-record retention: expired idempotency keys are deleted in small batches.

Key deduplication holds for ``worker.inbox_retention_s`` (the horizon, like
an API's idempotency-key expiry): a copy of a key that arrives later is
applied again. Position deduplication never expires, because the
``positions`` row and its high-water mark are never pruned, so replaying
old offsets stays a no-op after pruning.

Pruning deletes at most ``prune_batch_size`` rows per transaction and skips
rows locked by in-flight batches, so it neither blocks the consumer nor
holds long locks.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import asyncpg

from consumer import kafka
from consumer.settings import KafkaSettings

__all__ = ["check_horizon", "prune", "prune_side_effects"]

logger = logging.getLogger(__name__)

# Pause between two pruning transactions, in seconds, to leave the database
# to the consumer under load.
_PAUSE_S = 0.01


async def prune(
    pool: asyncpg.Pool | asyncpg.Connection,
    queries: Any,
    dedup_scope: str,
    *,
    retention_s: float,
    batch_size: int,
    max_batches: int | None = None,
) -> int:
    """Delete dedup records of `dedup_scope` older than `retention_s`; return how many were deleted."""
    deleted = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        status: str = await pool.execute(queries.prune_batch, dedup_scope, retention_s, batch_size)
        count = int(status.split()[-1])
        deleted += count
        batches += 1
        if count < batch_size:
            break
        await anyio.sleep(_PAUSE_S)
    if deleted:
        logger.info(
            "pruned %d expired dedup records",
            deleted,
            extra={"action": "inbox_pruned", "dedup_scope": dedup_scope, "count": deleted},
        )
    return deleted


async def prune_side_effects(
    pool: asyncpg.Pool | asyncpg.Connection, side_queries: Any, dedup_scope: str, *, retention_s: float, batch_size: int
) -> int:
    """Delete step results and sent outbox rows older than `retention_s`, in batches; return how many."""
    deleted = 0
    for query in (side_queries.prune_steps, side_queries.prune_outbox):
        while True:
            status: str = await pool.execute(query, dedup_scope, retention_s, batch_size)
            count = int(status.split()[-1])
            deleted += count
            if count < batch_size:
                break
            await anyio.sleep(_PAUSE_S)
    return deleted


async def check_horizon(settings: KafkaSettings, topics: list[str], retention_s: float) -> None:
    """Warn when a topic keeps messages longer than dedup records are kept."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = kafka.admin(settings)
    try:
        await admin.start()
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics])
    except Exception as exc:
        # Some brokers and ACL setups do not answer DescribeConfigs; the check is advisory.
        logger.info(
            "topic retention not checked: %s: %s",
            type(exc).__name__,
            exc,
            extra={"action": "retention_check_skipped"},
        )
        return
    finally:
        await admin.close()
    for topic, retention_ms in _retention_ms(responses).items():
        if retention_ms is not None and (retention_ms < 0 or retention_ms / 1000 > retention_s):
            kept = "forever" if retention_ms < 0 else f"{retention_ms / 86_400_000:.1f} days"
            logger.warning(
                "topic %s keeps messages %s but dedup records are kept %.1f days: a copy of a key republished "
                "later than that is applied again; raise CONSUMER_WORKER__INBOX_RETENTION_S if that matters",
                topic,
                kept,
                retention_s / 86_400,
                extra={"action": "retention_horizon_short", "topic": topic},
            )


def _retention_ms(responses: Any) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for response in responses:
        for resource in getattr(response, "resources", []):
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name = resource[3]
            found[name] = None
            for entry in resource[4]:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    found[name] = int(entry[1])
    return found
