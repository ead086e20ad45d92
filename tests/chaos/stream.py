"""The seeded message stream of a chaos run: logical messages, their producer duplicates, and handler faults.

A logical message is one idempotency key with one payload. About
`duplicate_ratio` of them are produced more than once, as a producer that
retries or re-sends would. A copy has the same key and the same bytes at a
later offset, on the same partition or on another one, soon after the first
copy or much later. All copies of a key together must be applied once.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tests.chaos.handler import Hooks

__all__ = ["PlannedRecord", "Stream", "StreamShape", "plan_stream"]


@dataclass(frozen=True)
class PlannedRecord:
    """One record to produce: a copy of the logical message `key`."""

    key: str
    partition: int
    value: bytes
    # 0 for the first copy of the key, 1 and up for producer duplicates.
    copy: int


@dataclass(frozen=True)
class StreamShape:
    """How many messages, how many partitions, and which share of keys gets each fault."""

    messages: int
    partitions: int = 4
    duplicate_ratio: float = 0.2
    transient_ratio: float = 0.03
    permanent_ratio: float = 0.005
    sleep_ratio: float = 0.02
    # Maximum handler sleep of a sleeping key, in seconds.
    max_sleep_s: float = 2.0


@dataclass(frozen=True)
class Stream:
    """Logical keys, the records to produce in order, and the hooks of the handler."""

    keys: list[str]
    records: list[PlannedRecord]
    hooks: Hooks

    @property
    def duplicates(self) -> int:
        return len(self.records) - len(self.keys)


def plan_stream(rng: random.Random, shape: StreamShape) -> Stream:
    """Draw the stream of `shape` from `rng`; the same seed gives the same stream."""
    keys = [f"m{index:06d}" for index in range(shape.messages)]
    timed: list[tuple[float, PlannedRecord]] = []
    for index, key in enumerate(keys):
        home = rng.randrange(shape.partitions)
        value = json.dumps({"id": key, "amount": rng.randrange(1, 1000)}).encode()
        timed.append((float(index), PlannedRecord(key, home, value, 0)))
        if rng.random() >= shape.duplicate_ratio:
            continue
        copies = 1 if rng.random() < 0.8 else 2
        for copy in range(1, copies + 1):
            partition = home if rng.random() < 0.4 else rng.randrange(shape.partitions)
            # Most copies follow within a few batches; some come much later,
            # after the first copy's dedup record is long committed.
            delay = rng.uniform(0, 50) if rng.random() < 0.7 else rng.uniform(50, shape.messages)
            timed.append((index + delay, PlannedRecord(key, partition, value, copy)))
    timed.sort(key=lambda entry: entry[0])
    return Stream(keys=keys, records=[record for _, record in timed], hooks=_draw_hooks(rng, keys, shape))


def _draw_hooks(rng: random.Random, keys: list[str], shape: StreamShape) -> Hooks:
    def sample(ratio: float) -> list[str]:
        return rng.sample(keys, max(1, round(len(keys) * ratio)))

    sleeping = sample(shape.sleep_ratio)
    half = len(sleeping) // 2
    return Hooks(
        transient=frozenset(sample(shape.transient_ratio)),
        permanent=frozenset(sample(shape.permanent_ratio)),
        sleep_before_s={key: round(rng.uniform(0.1, shape.max_sleep_s), 2) for key in sleeping[:half]},
        sleep_after_s={key: round(rng.uniform(0.1, shape.max_sleep_s), 2) for key in sleeping[half:]},
    )
