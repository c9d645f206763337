"""Partition ownership: which partitions this worker owns, which run lives on which, and the replay of each newly
assigned partition before any of its inputs is handled.

faust resumes fetching before its rebalance callback returns (its recovery task resumes the streams when there are
no tables), so inputs can arrive while a partition is still being replayed: `until_replayed` holds them. What a
replay reads and folds is `replay.py`; what the engine does with the runs it finds is its `load` and `resume`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from services.executor import metrics
from services.executor.replay import PartitionScan

log = logging.getLogger(__name__)
T = TypeVar("T")

# (partition) → its ledger read and its open runs rebuilt; then, once it is owned, (partition, scan) → runs resumed.
Load = Callable[[int], Awaitable[PartitionScan]]
Resume = Callable[[int, PartitionScan], Awaitable[int]]


class Partitions:
    def __init__(self, load: Load, resume: Resume) -> None:
        self._load = load
        self._resume = resume
        self.owned: set[int] = set()
        self.partition_of: dict[str, int] = {}  # the partition of each live run
        # Set once a partition's runs are rebuilt; inputs of a partition not yet replayed wait for it.
        self.replayed: dict[int, asyncio.Event] = {}
        self.foreign: set[int] = set()  # partitions the last assignment gave to another worker
        self.replaying: dict[int, asyncio.Task[None]] = {}
        # False until the consumer group's first assignment (which may give this worker no partition at all).
        self.assigned = False

    def claim(self, run_id: str, partition: int) -> None:
        """The run lives on this (owned) partition: its events are appended there."""
        self.partition_of[run_id] = partition

    def of(self, run_id: str) -> int:
        return self.partition_of[run_id]

    def runs_of(self, partition: int) -> list[str]:
        return [run_id for run_id, p in self.partition_of.items() if p == partition]

    async def assign(self, partitions: Iterable[int], *, background: bool = False) -> None:
        """Replay each newly assigned partition. `partitions` is the whole assignment. Inputs may already be
        waiting (`until_replayed`): those of a partition that went to another worker are released to be skipped,
        those of ours wait for its replay.

        `background=True` (the worker's rebalance callback) starts the replays and returns at once: aiokafka
        sends no heartbeats while the callback runs, so a replay longer than the session timeout would get the
        worker dropped from the group, rejoin, and replay everything again, forever.
        """
        self.assigned = True
        assigned = set(partitions)
        for partition in [p for p in self.replayed if p not in assigned and p not in self.owned]:
            self.foreign.add(partition)
            self.replayed.pop(partition).set()
        self.foreign -= assigned
        for partition in sorted(assigned - self.owned - self.replaying.keys()):
            self.replaying[partition] = asyncio.create_task(self._replay_logged(partition), name=f"replay:{partition}")
        if not background:
            await asyncio.gather(*[t for p, t in self.replaying.items() if p in assigned])

    async def _replay_logged(self, partition: int) -> None:
        began = time.perf_counter()
        try:
            scan = await self._load(partition)
            self.owned.add(partition)
            self.replayed.setdefault(partition, asyncio.Event()).set()
            resumed = await self._resume(partition, scan)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The partition's runs are in an unknown state and its inputs wait for this replay: start over clean.
            log.critical("partition %s: replay failed; exiting to rebuild from the ledger", partition, exc_info=True)
            os._exit(70)
        finally:
            # Only its own entry: a revoke may have cancelled this replay and a new assignment started another.
            if self.replaying.get(partition) is asyncio.current_task():
                del self.replaying[partition]
        metrics.REPLAY_SECONDS.observe(time.perf_counter() - began)
        since = f"the snapshot at offset {scan.restored_from.offset}" if scan.restored_from else "offset 0"
        log.info("partition %s: %s events replayed from %s in %.1f s (%s in all), %s runs resumed", partition,
                 scan.replayed, since, time.perf_counter() - began, scan.count, resumed)  # fmt: skip

    def revoke(self, partitions: Iterable[int]) -> list[str]:
        """Give the partitions up; returns their runs, forgotten here (the engine stops them). Their inputs now wait
        for the next assignment to say whether they are still ours."""
        gone = set(partitions)
        runs = [run_id for run_id, p in self.partition_of.items() if p in gone]
        for run_id in runs:
            del self.partition_of[run_id]
        self.owned -= gone
        for partition in gone:
            self.replayed.pop(partition, None)
            replay = self.replaying.pop(partition, None)
            if replay is not None:
                replay.cancel()
        return runs

    async def until_replayed(self, inputs: list[tuple[int, T]]) -> list[tuple[int, T]]:
        """The inputs to handle now: those of owned partitions, once replayed. A redelivered trigger handled before
        its partition's replay would start its run again from seq 0 (a second, different event at seqs already
        used), a command would be dropped as aimed at an unknown run. Inputs of a partition that went to another
        worker are left to it (their offsets are not ours to commit)."""
        for partition in {p for p, _ in inputs}:
            if partition not in self.owned and partition not in self.foreign:
                await self.replayed.setdefault(partition, asyncio.Event()).wait()
        skipped = [i for i in inputs if i[0] not in self.owned]
        if skipped:
            log.warning("%d input(s) of partitions now owned elsewhere left to their owner", len(skipped))
        return [i for i in inputs if i[0] in self.owned]
