"""Kafka topic names, built from one prefix so tests can give each test its own topic set."""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "flowtrail"

    @property
    def triggers(self) -> str:
        return f"{self.prefix}.triggers"

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}.ledger"

    @property
    def flows(self) -> str:
        return f"{self.prefix}.flows"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def all(self) -> list[str]:
        return [self.triggers, self.commands, self.ledger, self.flows, self.dlq]


# Topics keyed by run_id share one partition count, so partition N of the triggers and
# the ledger belong to the same executor instance. Flows are few: one partition keeps
# their order total. The ledger is kept forever: it is the truth (invariant 1).
KEEP_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1"}
COMPACTED = {"cleanup.policy": "compact"}


def partition_for(run_id: str, partitions: int) -> int:
    """The partition of a run on the run-keyed topics. Every producer of the triggers topic uses this one
    function (C-speed crc32, not the client's pure-Python murmur2), so a run's requests meet in one place."""
    return zlib.crc32(run_id.encode()) % partitions
