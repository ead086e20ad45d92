"""In-process counters of one worker, for the shutdown summary and the metrics endpoint.

Durable totals live in the ``positions`` table, updated in each batch
transaction; these counters cover only the life of this process.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    started_at: float = field(default_factory=time.monotonic)
    fetched: int = 0
    applied: int = 0
    position_duplicates: int = 0
    key_duplicates: int = 0
    dead_lettered: int = 0
    parked: int = 0
    conflicts: int = 0
    tombstones_skipped: int = 0
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    infrastructure_retries: int = 0
    batches: int = 0
    handler_calls: int = 0
    rebalances: int = 0
    kafka_commit_failures: int = 0
    offsets_lost: int = 0

    def summary(self) -> dict[str, float | int]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "fetched": self.fetched,
            "applied": self.applied,
            "position_duplicates": self.position_duplicates,
            "key_duplicates": self.key_duplicates,
            "dead_lettered": self.dead_lettered,
            "parked": self.parked,
            "conflicts": self.conflicts,
            "tombstones_skipped": self.tombstones_skipped,
            "retries": self.retries,
            "infrastructure_retries": self.infrastructure_retries,
            "batches": self.batches,
            "rebalances": self.rebalances,
            "offsets_lost": self.offsets_lost,
            "duration_s": round(elapsed, 3),
        }
