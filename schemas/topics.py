"""Kafka topic names, built from one prefix so tests can give each test its own topic set."""

from __future__ import annotations

import zlib
from dataclasses import dataclass


class _Topic:
    """A topic of the set, named after its attribute: `Topics("x").ledger` is `x.ledger`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, topics: Topics, owner: type | None = None) -> str:
        return f"{topics.prefix}.{self.name}"


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "flowtrail"

    triggers = _Topic()
    commands = _Topic()
    ledger = _Topic()
    flows = _Topic()
    dlq = _Topic()
    snapshots = _Topic()

    def all(self) -> list[str]:
        return [self.triggers, self.commands, self.ledger, self.flows, self.dlq, self.snapshots]


# Topics keyed by run_id share one partition count, so partition N of the triggers and
# the ledger belong to the same executor instance. Flows are few: one partition keeps
# their order total. The ledger is kept forever: it is the truth (invariant 1).
KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
COMPACTED = {"cleanup.policy": "compact"}
# The executor's snapshots, one per ledger partition, each the state of that partition's scan (docs/decisions.md):
# only the latest matters, so the topic is compacted, its segments roll hourly so old ones can be compacted away,
# and a record may be as large as SNAPSHOT_MAX_BYTES (the producer's and consumers' sizes follow it).
SNAPSHOT_MAX_BYTES = 64 * 1024 * 1024
SNAPSHOT_TOPIC_CONFIG = {
    **COMPACTED,
    "max.message.bytes": str(SNAPSHOT_MAX_BYTES),
    "segment.ms": str(3_600_000),
}


def partition_for(run_id: str, partitions: int) -> int:
    """The partition of a run on the run-keyed topics. Every producer of the triggers topic uses this one
    function (C-speed crc32, not the client's pure-Python murmur2), so a run's requests meet in one place."""
    return zlib.crc32(run_id.encode()) % partitions
