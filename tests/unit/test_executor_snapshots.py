"""Executor snapshots (services/executor/snapshots.py): a scan stored after any prefix of a partition's records and
restored, then fed the rest, is the scan that read them all; bytes that are not a snapshot this code wrote are
refused, so the engine replays the whole partition instead."""

from __future__ import annotations

import struct
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.executor import snapshots
from services.executor.finished import FinishedRuns, run_hash
from services.executor.replay import CHILD_RENOTIFY_WINDOW, LogPosition, PartitionScan
from tests.unit.drive import T0
from tests.unit.test_executor_parts import ended, raw, started

# A pool of runs the strategies pick from, each as the records the replay reads: open ones (started, waiting on a
# step), ended ones, ended children (their parent is told again after a restore), and ended ones later archived.
OPEN = {f"run-open-{i}": raw(started(f"run-open-{i}")) for i in range(4)}
ENDED = {f"run-ended-{i}": raw(ended(f"run-ended-{i}")) for i in range(4)}
CHILDREN = {
    f"run_child_{i}": raw(ended(f"run_child_{i}", parent_run_id="run-parent", parent_step="spawn", parent_attempt=1))
    for i in range(2)
}


def _archived(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*records, {**records[-1], "type": "RunArchived", "seq": len(records), "payload": {}}]


ARCHIVED = {f"run-archived-{i}": _archived(raw(ended(f"run-archived-{i}"))) for i in range(2)}
POOL = {**OPEN, **ENDED, **CHILDREN, **ARCHIVED}
JUNK = {"type": "RunStarted"}  # no run id: counted, skipped


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Some runs of the pool, their records interleaved (each run's in its own order), with junk here and there."""
    chosen = draw(st.lists(st.sampled_from(sorted(POOL)), unique=True, min_size=1))
    queues = {run_id: list(POOL[run_id]) for run_id in chosen}
    out: list[dict[str, Any]] = []
    while queues:
        run_id = draw(st.sampled_from(sorted(queues)))
        out.append(queues[run_id].pop(0))
        if not queues[run_id]:
            del queues[run_id]
        if draw(st.integers(0, 19)) == 0:
            out.append(JUNK)
    return out


def feed(scan: PartitionScan, records: list[dict[str, Any]], first: int, batch: int) -> PartitionScan:
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        last = first + i + len(chunk) - 1
        scan.take(chunk, LogPosition(last, f"d{last}"))
    return scan


def state(scan: PartitionScan) -> dict[str, Any]:
    """Everything a scan hands the engine, and everything a later snapshot of it stores."""
    return {
        "finished": scan.finished.items(),
        "archived": scan.archived,
        "open": [(r.run_id, r.next_seq, r.status) for r in scan.open_runs()],
        "open_raw": list(scan.open_raw.items()),
        "children": [(c.run_id, c.parent_run_id, c.status) for c in scan.ended_children],
        "count": scan.count,
        "position": scan.position,
    }


def fresh(now: Any = T0) -> PartitionScan:
    return PartitionScan(0, FinishedRuns(), set(), now)


@settings(max_examples=150, deadline=None)
@given(records=streams(), data=st.data())
def test_a_restored_snapshot_fed_the_rest_of_the_log_equals_a_scan_of_all_of_it(
    records: list[dict[str, Any]], data: st.DataObject
) -> None:
    split = data.draw(st.integers(1, len(records)), label="snapshot after record")
    batch = data.draw(st.integers(1, 7), label="batch size")
    whole = feed(fresh(), records, 0, batch)
    prefix = feed(fresh(), records[:split], 0, batch)
    restored = snapshots.decode(snapshots.encode(prefix), partition=0, now=T0)
    assert restored.restored_from == prefix.position == LogPosition(split - 1, f"d{split - 1}")
    feed(restored, records[split:], split, batch)
    assert state(restored) == state(whole)
    assert restored.replayed == len(records) - split  # only the tail was read after the restore


def test_a_snapshot_keeps_a_child_that_ended_recently_only_while_it_is_recent() -> None:
    child = CHILDREN["run_child_0"]
    prefix = feed(fresh(), child, 0, 10)
    data = snapshots.encode(prefix)
    soon = snapshots.decode(data, partition=0, now=T0 + timedelta(hours=1))
    assert [c.run_id for c in soon.ended_children] == ["run_child_0"]
    later = snapshots.decode(data, partition=0, now=T0 + CHILD_RENOTIFY_WINDOW + timedelta(hours=1))
    assert later.ended_children == []  # its parent was told long ago: not told again
    assert later.finished.get("run_child_0") == len(child)  # but a redelivered trigger still finds it ended


def _valid() -> bytes:
    return snapshots.encode(feed(fresh(), OPEN["run-open-0"] + ENDED["run-ended-0"], 0, 3))


def _with_header(change: dict[str, Any]) -> bytes:
    data = _valid()
    _, _, length = struct.unpack_from(">6sHI", data)
    header = {**orjson.loads(data[12 : 12 + length]), **change}
    body = orjson.dumps(header)
    return struct.pack(">6sHI", b"FTSNAP", 1, len(body)) + body + data[12 + length :]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a snapshot at all",
        struct.pack(">6sHI", b"FTSNAP", 2, 2) + b"{}",  # a version this code does not read
        _valid()[:-8],  # cut short
        _valid()[:20] + b"\xff" + _valid()[21:],  # the header garbled
        _with_header({"finished": 5}),  # the arrays do not match the count
        _with_header({"open": {"run-x": []}}),
        _with_header({"partition": 3}),  # another partition's
        _with_header({"offset": "x"}),
    ],
)
def test_bytes_that_are_not_a_snapshot_this_code_wrote_are_refused(data: bytes) -> None:
    with pytest.raises(snapshots.SnapshotError):
        snapshots.decode(data, partition=0, now=T0)


def test_a_scan_that_took_nothing_has_no_snapshot() -> None:
    with pytest.raises(ValueError):
        snapshots.encode(fresh())


def test_the_engine_joins_each_partitions_ended_runs_keeping_the_higher_next_seq() -> None:
    engine, first, second, again = FinishedRuns(), FinishedRuns(), FinishedRuns(), FinishedRuns()
    first["run-a"], first["run-b"] = 3, 5
    second["run-c"] = 2
    engine.absorb(0, first)
    engine["run-d"] = 4  # ended live, not yet compacted
    engine.absorb(1, second)
    engine["run-c"] = 3  # archived live: one more event
    engine.compact()
    assert {r: engine.get(r) for r in ("run-a", "run-b", "run-c", "run-d", "run-e")} == {
        "run-a": 3, "run-b": 5, "run-c": 3, "run-d": 4, "run-e": None,
    }  # fmt: skip
    assert len(engine) == 5  # run-c counts twice: ended live after its partition's replay was absorbed
    # Partition 0 replayed again (reassigned): its new replay replaces the old one, archived run-b included.
    again["run-a"], again["run-b"] = 3, 6
    engine.absorb(0, again)
    assert (engine.get("run-a"), engine.get("run-b"), engine.get("run-c")) == (3, 6, 3)
    assert engine.items() == {**first.items(), **second.items(), **again.items(), **_hashes(c=3, d=4)}


def _hashes(**seqs: int) -> dict[int, int]:
    return {run_hash(f"run-{name}"): seq for name, seq in seqs.items()}
