"""The executor's periodic snapshot writer on the real broker (services/executor/adapters/snapshots.py): it writes a
partition's snapshot once enough events are new, builds each from the previous one and the ledger's tail, and the
scan a restart gets from it equals a whole replay."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas import codec
from services.common import kafka
from services.executor import snapshots
from services.executor.adapters.ledger import iter_partition_tail
from services.executor.adapters.snapshots import SnapshotStore, Snapshotter, scan_partition
from services.executor.finished import FinishedRuns
from services.executor.replay import PartitionScan
from tests.conftest import Sandbox
from tests.unit.test_executor_parts import ended, started


async def append(sandbox: Sandbox, runs: list[Any]) -> None:
    producer = kafka.producer(sandbox.infra.kafka_bootstrap)
    await producer.start()
    try:
        for run in runs:
            for event in run.ledger:
                await producer.send(sandbox.topics.ledger, codec.dumps(event), key=event.run_id.encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def whole_replay(sandbox: Sandbox) -> PartitionScan:
    scan = PartitionScan(0, FinishedRuns(), set(), datetime.now(UTC))
    async for batch, position in iter_partition_tail(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, 0):
        scan.take(batch, position)
    return scan


def same(a: PartitionScan, b: PartitionScan) -> None:
    assert a.finished.items() == b.finished.items() and a.archived == b.archived
    assert [(r.run_id, r.next_seq) for r in a.open_runs()] == [(r.run_id, r.next_seq) for r in b.open_runs()]
    assert (a.count, a.position) == (b.count, b.position)


async def test_the_writer_snapshots_a_partition_once_enough_is_new_and_a_restart_reads_only_what_follows(
    sandbox: Sandbox,
) -> None:
    bootstrap, ledger = sandbox.infra.kafka_bootstrap, sandbox.topics.ledger
    store = SnapshotStore(bootstrap, sandbox.topics, sandbox.partitions)
    first = [ended(f"run-a{i}") for i in range(5)] + [started("run-open")]
    events_first = sum(len(r.ledger) for r in first)
    writer = Snapshotter(bootstrap, ledger, store, lambda: [0], interval_s=60, min_events=events_first)
    try:
        await append(sandbox, first)
        assert await writer.refresh(0)  # no snapshot yet: a whole scan, written
        assert await writer.refresh(0) is False  # nothing new since
        restored = await scan_partition(bootstrap, ledger, store, 0)
        assert restored.restored_from is not None and restored.restored_from.offset == events_first - 1
        assert restored.replayed == 0
        same(restored, await whole_replay(sandbox))

        later = [ended(f"run-b{i}") for i in range(3)]
        await append(sandbox, later)
        events_later = sum(len(r.ledger) for r in later)
        assert events_later < events_first and await writer.refresh(0) is False  # too few new events yet
        await append(sandbox, [ended(f"run-c{i}") for i in range(3)])
        assert await writer.refresh(0)  # the previous snapshot and the tail after it
        restored = await scan_partition(bootstrap, ledger, store, 0)
        assert restored.replayed == 0 and restored.count == events_first + 2 * events_later
        same(restored, await whole_replay(sandbox))
        assert [r.run_id for r in restored.open_runs()] == ["run-open"]
        assert restored.finished.get("run-b0") == len(later[0].ledger)

        # A snapshot the writer cannot decode is replaced by a whole scan's, not fatal.
        await store.write(0, b"FTSNAP garbage")
        assert (await scan_partition(bootstrap, ledger, store, 0)).restored_from is None  # replayed whole
        writer.covered.clear()
        assert await writer.refresh(0)
        data = await store.latest(0)
        assert data is not None
        same(snapshots.decode(data, partition=0, now=datetime.now(UTC)), await whole_replay(sandbox))
    finally:
        await writer.close()
