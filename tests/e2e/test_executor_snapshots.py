"""An executor restarted after a snapshot replays only the ledger after it and loses, repeats and restarts nothing
(invariants 2 and 3 across the window between a snapshot and later appends; docs/architecture.md, Recovery).

The real stack runs with a time scale of 0.01. Runs end, pause on a human_input step or wait in a durable delay;
the executor is killed (SIGKILL) and restarted, and its replay writes each partition's snapshot; more runs then
start, end and pause after the snapshot; a second SIGKILL and restart must restore the snapshot and read only the
ledger's tail. Triggers of runs that ended before and after the snapshot are then delivered again: nothing starts.
Finally snapshots that do not match the ledger (past its end, another record at their offset) are ignored: the
partition is replayed whole, with the same outcome.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import TopicPartition

from schemas.topics import partition_for
from services.common import kafka
from services.executor import snapshots
from services.executor.adapters.snapshots import SnapshotStore
from services.executor.replay import LogPosition
from tests.conftest import Infra
from tests.e2e.test_executor_crash import ledger_by_run
from tests.harness import TERMINAL, Env, end_offsets, flow, ledger, running, step_status, topic_records, wait_until

SCALE = 0.01
DELAY_S = 6000.0  # scaled: 60 real seconds, still waiting across both restarts
STARTED = re.compile(r"^----- .* flowtrail supervisor: starting", re.M)
REPLAYED = re.compile(r"partition (\d+): (\d+) events replayed from (the snapshot at offset (\d+)|offset 0)")
WRITTEN = re.compile(r"partition (\d+): snapshot at offset (\d+) written")


def _flows() -> list[Any]:
    shape = {"name": "shape", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}
    approve = {"name": "approve", "action": "human_input", "input": {"q": "ship?"}}
    wait = {"name": "wait", "action": "delay", "input": {"seconds": DELAY_S}}
    return [
        flow("tenant-a", "quick", [shape], name="quick"),
        flow("tenant-a", "approval", [shape, approve, {**shape, "name": "ship"}], name="approval"),
        flow("tenant-a", "delay", [shape, wait, {**shape, "name": "after"}], name="delay"),
    ]


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    extra = {
        "FLOWTRAIL_EXECUTOR_TIME_SCALE": str(SCALE),
        # Snapshots only after a replay (the periodic writer never runs during the test): the test knows which
        # events came after each one.
        "FLOWTRAIL_EXECUTOR_SNAPSHOT_INTERVAL_S": "3600",
        "FLOWTRAIL_EXECUTOR_SNAPSHOT_MIN_EVENTS": "1",
    }
    async with running(infra, tmp_path_factory, flows=_flows(), env=extra) as env:
        yield env


def this_start_log(env: Env) -> str:
    """The executor's log since its last start."""
    text = env.stack["executor"].log_path.read_text(errors="replace")
    starts = list(STARTED.finditer(text))
    return text[starts[-1].end() :] if starts else text


async def restart_executor(env: Env) -> dict[int, int]:
    """SIGKILL the executor, start it again, wait until it owns every partition; the ledger's end offsets at the
    kill (nothing writes the ledger while it is down)."""
    executor = env.stack["executor"]
    executor.kill()
    ends = await end_offsets(env.sandbox.infra.kafka_bootstrap, [env.sandbox.topics.ledger])
    executor.start()
    await executor.wait_healthy()

    async def replayed_all() -> bool:
        return len({m[0] for m in REPLAYED.findall(this_start_log(env))}) == env.sandbox.partitions

    await wait_until(replayed_all, 60, "every partition replayed", logs=env.log_tails)
    return {tp.partition: end for tp, end in ends.items()}


def replays(env: Env) -> dict[int, tuple[int, int | None]]:
    """Each partition's replay since the last start: (events replayed, the snapshot's offset or None)."""
    return {int(p): (int(n), int(at) if at else None) for p, n, _, at in REPLAYED.findall(this_start_log(env))}


async def wait_snapshots(env: Env) -> dict[int, int]:
    """The offset of each partition's snapshot written since the last start."""

    async def written() -> bool:
        return len(dict(WRITTEN.findall(this_start_log(env)))) == env.sandbox.partitions

    await wait_until(written, 30, "every partition's snapshot written", logs=env.log_tails)
    return {int(p): int(at) for p, at in WRITTEN.findall(this_start_log(env))}


async def redeliver_triggers(env: Env, run_ids: set[str]) -> None:
    """Append the triggers of `run_ids` again, byte for byte, to their partitions (a producer's retry, a
    scheduler's double tick), then wait until the executor has handled them: a fresh run on every partition
    after them has ended."""
    box = env.sandbox
    records = await topic_records(box.infra.kafka_bootstrap, [box.topics.triggers])
    again = [r for r in records if r.key is not None and r.key.decode() in run_ids]
    assert {r.key.decode() for r in again if r.key} == run_ids
    producer = kafka.producer(box.infra.kafka_bootstrap)
    await producer.start()
    try:
        for record in again:
            await producer.send_and_wait(box.topics.triggers, record.value, key=record.key, partition=record.partition)
    finally:
        await producer.stop()
    after: list[str] = []
    while {partition_for(r, box.partitions) for r in after} != set(range(box.partitions)):
        after += await env.trigger_many("quick", [{"n": 100 + len(after)}])
    await env.wait_all(after)


async def assert_ledger_whole(env: Env, groups: dict[str, list[str]]) -> dict[str, list[Any]]:
    """No seq carries two events, none is skipped, every run was requested once and (if ended) ended once."""
    group_of = {run_id: group for group, ids in groups.items() for run_id in ids}
    by_run = ledger_by_run(await ledger(env.sandbox), group_of)
    for run_id in group_of:
        types = [e.type for e in by_run[run_id]]
        assert [e.seq for e in by_run[run_id]] == list(range(len(types))), f"{run_id}: {types}"
        assert types.count("RunRequested") == 1, f"{group_of[run_id]} {run_id} started again: {types}"
    return by_run


async def wait_statuses(env: Env, run_ids: list[str], check: Any, what: str) -> None:
    async def reached() -> bool:
        return all(check(run) for run in await asyncio.gather(*(env.run(r) for r in run_ids)))

    await wait_until(reached, 30, what, logs=env.log_tails)


async def resume(env: Env, run_id: str) -> None:
    run = await env.run(run_id)
    assert run is not None and run["status"] == "PAUSED", run
    r = await env.api("POST", f"/v1/runs/{run_id}/resume/{run['waiting_for']['request_id']}", json={"by": "ops"})
    assert r.status_code == 202, r.text


def paused(run: dict[str, Any] | None) -> bool:
    return run is not None and run["status"] == "PAUSED"


def delaying(run: dict[str, Any] | None) -> bool:
    return step_status(run, "wait") == "RUNNING"


async def test_a_restart_after_a_snapshot_replays_only_the_tail_and_restarts_no_ended_run(env: Env) -> None:
    # ------------------------------------------------------------ before the snapshot
    runs = {
        "ended_before": await env.trigger_many("quick", [{"n": i} for i in range(10)]),
        "paused": await env.trigger_many("approval", [{"n": i} for i in range(4)]),
        "delayed": await env.trigger_many("delay", [{"n": i} for i in range(4)]),
    }
    await env.wait_all(runs["ended_before"])
    await wait_statuses(env, runs["paused"], paused, "approvals paused")
    await wait_statuses(env, runs["delayed"], delaying, "delays waiting")

    # A restart replays the whole ledger (no snapshot yet) and writes each partition's snapshot at its end.
    ends = await restart_executor(env)
    assert all(at is None for _, at in replays(env).values()), this_start_log(env)
    snapshot_at = await wait_snapshots(env)
    assert snapshot_at == {p: end - 1 for p, end in ends.items()}, (snapshot_at, ends)

    # ------------------------------------------------------------ after the snapshot
    await resume(env, runs["paused"][0])
    runs["ended_after"] = await env.trigger_many("quick", [{"n": i} for i in range(10, 20)])
    runs["paused_after"] = await env.trigger_many("approval", [{"n": i} for i in range(4, 6)])
    await env.wait_all(runs["ended_after"] + runs["paused"][:1])
    await wait_statuses(env, runs["paused_after"], paused, "later approvals paused")

    # ------------------------------------------------------------ SIGKILL: the snapshot and the tail
    ends = await restart_executor(env)
    replayed = replays(env)
    total = sum(ends.values())
    for partition, (count, at) in replayed.items():
        assert at == snapshot_at[partition], f"partition {partition} did not start from its snapshot: {replayed}"
        # Only the records after the snapshot were read (the ledger holds JSON records only: one event each).
        assert count == ends[partition] - 1 - at, (partition, count, ends, snapshot_at)
    assert 0 < sum(n for n, _ in replayed.values()) < total, (replayed, total)

    # Triggers of runs that ended before and after the snapshot, and of runs still open, delivered again.
    ended = set(runs["ended_before"] + runs["ended_after"] + runs["paused"][:1])
    await redeliver_triggers(env, ended | set(runs["paused"][1:]))

    # The open runs go on at their own next seqs: the paused ones resume, the delayed ones wake up.
    for run_id in runs["paused"][1:] + runs["paused_after"]:
        await resume(env, run_id)
    final = await env.wait_all([r for ids in runs.values() for r in ids], within=120)
    assert set(final.values()) == {"SUCCEEDED"}, final
    by_run = await assert_ledger_whole(env, runs)
    for run_id in runs["delayed"]:
        assert [e.type for e in by_run[run_id]].count("StepSucceeded") == 3
    assert all(s in TERMINAL for s in final.values())


async def test_a_snapshot_that_does_not_match_the_ledger_is_ignored_and_the_partition_replayed_whole(
    env: Env,
) -> None:
    runs = {
        "ended": await env.trigger_many("quick", [{"n": i} for i in range(200, 206)]),
        "paused": await env.trigger_many("approval", [{"n": i} for i in range(200, 202)]),
    }
    await env.wait_all(runs["ended"])
    await wait_statuses(env, runs["paused"], paused, "approvals paused")
    box = env.sandbox
    store = SnapshotStore(box.infra.kafka_bootstrap, box.topics, box.partitions)
    ends = await end_offsets(box.infra.kafka_bootstrap, [box.topics.ledger])
    try:
        for partition in range(box.partitions):
            data = await store.latest(partition)
            assert data is not None, f"partition {partition} has no snapshot"
            scan = snapshots.decode(data, partition=partition, now=datetime.now(UTC))
            assert scan.position is not None
            if partition == 0:  # a snapshot of a longer log (the ledger since recreated, shorter)
                end = ends[TopicPartition(box.topics.ledger, partition)]
                scan.position = LogPosition(end + 100, scan.position.digest)
            else:  # another record at its offset
                scan.position = LogPosition(scan.position.offset, "0" * 16)
            await store.write(partition, snapshots.encode(scan))
    finally:
        await store.close()

    await restart_executor(env)
    replayed = replays(env)
    assert all(at is None for _, at in replayed.values()), replayed  # from offset 0, every partition
    log_text = this_start_log(env)
    assert log_text.count("snapshot ignored") == box.partitions, log_text
    await redeliver_triggers(env, set(runs["ended"]))
    for run_id in runs["paused"]:
        await resume(env, run_id)
    final = await env.wait_all(runs["ended"] + runs["paused"])
    assert set(final.values()) == {"SUCCEEDED"}, final
    await assert_ledger_whole(env, runs)
