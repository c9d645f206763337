"""Memory after history (issue 6 item 8): each service's resident memory on a ledger of N finished runs.

The same four services run twice in this module: on an empty ledger (the baseline: steady state after a short
load) and on a ledger that already holds N finished 1-step runs (written straight to Kafka, as the executor
writes them). Each figure is the with-history value over the without-history one; "no growth with history"
is a ratio near 1. Then the executor's own replay code runs in this process on the same ledger, timed and
under tracemalloc, to say how many bytes a finished run keeps and where they are allocated.

The executor is also killed and restarted on the history twice: once its snapshots are written (it replays only
the ledger after them), then with every snapshot replaced by bytes it cannot decode (it replays the history whole,
the fallback of docs/architecture.md, Recovery), beside the same restart without history. The history's size is
the scale's `history_runs`; `FLOWTRAIL_BENCH_HISTORY_RUNS=1000000` sets it alone (the whole replay then takes
minutes).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.events import EventBase, FlowVersionPublished, TriggerInfo, TriggerReceived, TriggerType, new_run_id
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter
from services.executor.decide import Clock, StartRun, StepCompleted, decide_and_fold
from services.executor.engine import Engine
from services.executor.settings import ExecutorSettings
from tests.bench.ceilings import KafkaCeiling
from tests.bench.load import TENANT, Flowtrail, TriggerClient, noop_flow, profiled
from tests.bench.loaders import bench_sandbox, produce_history
from tests.bench.measure import prometheus_values, wait_until
from tests.bench.procstat import cpu_seconds
from tests.bench.report import Ceiling, Report, Target
from tests.bench.scale import Scale
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import Stack

FLOW = noop_flow("bench-history", 1)
SERVICES = ("executor", "projector", "api", "ingest")
# The steady load each stack gets before it is measured: enough to fill connection pools and caches.
LOAD_RUNS = 200
CONCURRENCY = 32
MB300 = Target("<=", 300, unit="MB")
RESTART = "executor restart → every partition replayed"
WHOLE_RESTART = "executor restart, snapshots unreadable → every partition replayed"


def patience(scale: Scale) -> float:
    """The bound on any one wait here: the scale's, or longer for a big history (a whole replay of 1,000,000 runs
    takes minutes, more on a loaded machine)."""
    return max(scale.timeout_s, scale.history_runs * 1.8e-3)


def finished_run(flow: FlowDefinition) -> list[EventBase]:
    """One run of `flow` as the executor's own decide() writes it: RunRequested … RunSucceeded, every step
    succeeding 2 ms after it started. The history is copies of this run."""
    t0 = datetime.now(UTC)
    trigger = TriggerReceived(
        tenant_id=flow.tenant_id, run_id=new_run_id(), flow_id=flow.id, flow_version=flow.version,
        trigger=TriggerInfo(type=TriggerType.API, caller="key_bench", payload={"order_id": "SO-1", "total_cents": 990}),
        received_at=t0,
    )  # fmt: skip
    events, state = decide_and_fold(None, flow, StartRun(trigger, flow.version), Clock(now=t0))
    for i, step in enumerate(flow.steps, start=1):
        done = StepCompleted(trigger.run_id, step.name, 1, True, step.input.get("output"), None, 0.3)
        more, state = decide_and_fold(state, flow, done, Clock(now=t0 + timedelta(milliseconds=2 * i)))
        events += more
    assert state is not None and state.terminal and events[-1].type == "RunSucceeded", [e.type for e in events]
    return events


def vm_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (the most it was ever resident), MB, from /proc/<pid>/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "peak"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


@dataclass
class Phase:
    """What one stack measured: memory per service at each point, and how long its startup steps took."""

    memory: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # point → service → rss/peak
    seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def measure(self, ft: Flowtrail, point: str) -> None:
        pids = ft.pids()
        for name in ft.stack.services:
            process = ft.stack[name].process
            assert process is not None and process.poll() is None, f"{name} exited:\n{ft.stack[name].log_tail()}"
        self.memory[point] = {name: vm_mb(pid) for name, pid in pids.items()}


async def write_history(box: Sandbox, runs: int, phase: Phase) -> None:
    """FLOW published, and `runs` finished runs of it in the ledger (none: only the flow)."""
    bootstrap = box.infra.kafka_bootstrap
    await publish_flow_events(bootstrap, box.topics, [
        FlowVersionPublished(tenant_id=TENANT, flow_id=FLOW.id, flow_version=FLOW.version, flow=FLOW)
    ])  # fmt: skip
    if runs:
        started = time.monotonic()
        per_partition = await produce_history(bootstrap, box.topics.ledger, box.partitions, finished_run(FLOW), runs)
        phase.seconds["write history"] = time.monotonic() - started
        phase.facts["events_per_partition"] = per_partition


@asynccontextmanager
async def flowtrail_on_history(infra: Infra, scale: Scale, log_dir: Path, runs: int,
                               phase: Phase) -> AsyncIterator[Flowtrail]:  # fmt: skip
    """A sandbox whose ledger holds `runs` finished runs of FLOW before the four services start on it."""
    async with bench_sandbox(infra, scale.partitions) as box:
        db = await connect(infra.database_url, box.schema)
        try:
            await ensure_tenant(db, TENANT, "Benchmarks")
            _, key = await create_api_key(db, TENANT)
            await write_history(box, runs, phase)
            logs = log_dir / ("history" if runs else "baseline")
            logs.mkdir(parents=True, exist_ok=True)
            stack = profiled(Stack.build(box, SERVICES, logs))
            spawned = time.monotonic()
            for service in stack.services.values():
                service.start()
            # Ready (an executor: every partition replayed) may take longer on a history than the stack's own wait.
            await asyncio.gather(*(s.wait_healthy(patience(scale)) for s in stack.services.values()))
            try:
                ft = Flowtrail(box, stack, key, db)
                await _until_caught_up(ft, scale, phase, spawned)
                yield ft
            finally:
                stack.stop()
        finally:
            await db.close()


async def executor_owns_all(ft: Flowtrail) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(ft.stack["executor"].url + "/healthz") as r:
            return len((await r.json())["partitions"]) == ft.sandbox.partitions
    except (aiohttp.ClientError, TimeoutError):
        return False  # busy folding a partition: its event loop answers once that is done


async def _until_caught_up(ft: Flowtrail, scale: Scale, phase: Phase, spawned: float) -> None:
    """Until the executor owns (so has replayed) every partition and the projector has projected every event."""
    box = ft.sandbox

    async def projected_all() -> bool:
        done = await ft.db.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM projector_offsets WHERE topic = $1", box.topics.ledger
        )
        flows = await ft.db.fetchval("SELECT count(*) FROM flows")
        return int(done) >= await ledger_end(box) and int(flows) >= 1

    executor = asyncio.create_task(wait_until(lambda: executor_owns_all(ft), within=patience(scale), interval=0.1,
                                              what="executor replay", on_timeout=ft.log_tails))  # fmt: skip
    projector = asyncio.create_task(wait_until(projected_all, within=patience(scale), interval=0.2,
                                               what="projection of the history", on_timeout=ft.log_tails))  # fmt: skip
    phase.seconds["executor start → every partition replayed"] = await executor - spawned
    phase.seconds["projector start → history projected"] = await projector - spawned


async def ledger_end(box: Sandbox) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=box.infra.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(box.topics.ledger, p) for p in range(box.partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def steady_load(ft: Flowtrail, scale: Scale) -> list[str]:
    """LOAD_RUNS runs through ingest, CONCURRENCY at a time, until each is final in the read model."""
    before = await ft.terminal_count(FLOW.id)
    client = TriggerClient(ft, CONCURRENCY)
    try:
        ids = await client.many(FLOW.id, LOAD_RUNS, CONCURRENCY)
    finally:
        await client.close()

    async def all_final() -> bool:
        return await ft.terminal_count(FLOW.id) >= before + LOAD_RUNS

    await wait_until(all_final, within=patience(scale), interval=0.05, what="steady load", on_timeout=ft.log_tails)
    statuses = dict(await ft.db.fetch("SELECT status, count(*) FROM runs WHERE id = ANY($1) GROUP BY 1", ids))
    assert statuses == {"SUCCEEDED": LOAD_RUNS}, statuses
    return ids


async def answers(ft: Flowtrail, run_ids: list[str]) -> None:
    """Every service answers its health check, and the API serves these runs (each SUCCEEDED) and a runs page."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        for name in SERVICES:
            async with s.get(ft.stack[name].url + "/healthz") as r:
                assert r.status == 200, f"{name} /healthz answered {r.status}: {await r.text()}"
        auth = {"Authorization": f"Bearer {ft.key}"}
        for run_id in run_ids:
            async with s.get(f"{ft.api}/v1/runs/{run_id}", headers=auth) as r:
                body = await r.json()
                assert r.status == 200 and body["status"] == "SUCCEEDED", body
        async with s.get(f"{ft.api}/v1/runs", params={"flow_id": FLOW.id, "limit": "50"}, headers=auth) as r:
            assert r.status == 200 and len((await r.json())["data"]) == 50, await r.text()


async def executor_metric(ft: Flowtrail, sample: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(ft.stack["executor"].url + "/metrics") as r:
        return prometheus_values(await r.text()).get(sample, 0.0)


async def replayed_events(ft: Flowtrail) -> float:
    return await executor_metric(ft, "flowtrail_executor_replayed_events_total")


async def restart_executor(ft: Flowtrail, scale: Scale, phase: Phase, *, snapshots: bool,
                           unreadable: bool = False) -> None:  # fmt: skip
    """SIGKILL the executor (once every partition's snapshot is written, if `snapshots`) and start it again: how
    long until it owns every partition, and how many events it replayed to get there. `unreadable`: every
    partition's latest snapshot is overwritten with bytes that are not a snapshot first, so the restart replays
    the whole ledger (recorded under WHOLE_RESTART and the point "restarted whole")."""
    if snapshots:

        async def written() -> bool:
            sample = 'flowtrail_executor_snapshots_total{outcome="written"}'
            return await executor_metric(ft, sample) >= ft.sandbox.partitions

        await wait_until(written, within=patience(scale), interval=0.2, what="snapshots written",
                         on_timeout=ft.log_tails)  # fmt: skip
    executor = ft.stack["executor"]
    executor.kill()
    if unreadable:
        await spoil_snapshots(ft.sandbox)
    spawned = time.monotonic()
    executor.start()
    owned = await wait_until(lambda: executor_owns_all(ft), within=patience(scale), interval=0.1,
                             what="executor restart", on_timeout=ft.log_tails)  # fmt: skip
    suffix = "_whole" if unreadable else ""
    phase.seconds[WHOLE_RESTART if unreadable else RESTART] = owned - spawned
    # CPU the new process spent until then, and the machine's load: on a shared machine the wall time is mostly
    # waiting for a core.
    assert executor.process is not None
    phase.facts[f"cpu_seconds_to_restart{suffix}"] = cpu_seconds(executor.process.pid)
    phase.facts[f"load_at_restart{suffix}"] = os.getloadavg()[0]
    phase.facts[f"replayed_events_after_restart{suffix}"] = await replayed_events(ft)
    # The replays alone (partitions replay side by side: the sum over them), without the process's own start.
    phase.facts[f"replay_seconds_after_restart{suffix}"] = await executor_metric(
        ft, "flowtrail_executor_replay_seconds_sum"
    )
    phase.measure(ft, "restarted whole" if unreadable else "restarted")


async def spoil_snapshots(box: Sandbox) -> None:
    """A record that is not a snapshot, last in every partition of the snapshots topic: the executor ignores it
    (counted as undecodable) and replays its partitions from offset 0."""
    producer = AIOKafkaProducer(bootstrap_servers=box.infra.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for p in range(box.partitions):
            await producer.send_and_wait(box.topics.snapshots, b"not a snapshot", key=str(p).encode(), partition=p)
    finally:
        await producer.stop()


async def run_phase(infra: Infra, scale: Scale, log_dir: Path, runs: int) -> Phase:
    phase = Phase()
    async with flowtrail_on_history(infra, scale, log_dir, runs, phase) as ft:
        if runs:
            final = await ft.db.fetchval("SELECT count(*) FROM runs WHERE status = 'SUCCEEDED'")
            assert final == runs, f"{final} of the {runs} history runs projected SUCCEEDED"
            replayed = await replayed_events(ft)
            assert replayed >= sum(phase.facts["events_per_partition"]), (replayed, phase.facts)
            phase.facts["replayed_events_when_caught_up"] = replayed
            sample = "flowtrail_executor_replay_seconds_sum"
            phase.facts["replay_seconds_whole"] = await executor_metric(ft, sample)
            oldest = await ft.db.fetchval("SELECT id FROM runs ORDER BY created_at LIMIT 1")
            phase.measure(ft, "replayed")
        ids = await steady_load(ft, scale)
        await answers(ft, ids[-1:] + ([oldest] if runs else []))
        phase.measure(ft, "load")
        # More than the history means the executor replayed it again: its group rebalanced (e.g. a lost session).
        phase.facts["replayed_events_after_load"] = await replayed_events(ft)
        phase.facts["ledger_events_after_load"] = await ledger_end(ft.sandbox)  # the history's and the load's
        # The history's snapshot was written after the first replay; the load came after it.
        await restart_executor(ft, scale, phase, snapshots=bool(runs))
        if runs:
            assert phase.facts["replayed_events_after_restart"] < sum(phase.facts["events_per_partition"]), phase.facts
            # The same restart without a usable snapshot: the history replayed whole, with the projector idle.
            await restart_executor(ft, scale, phase, snapshots=False, unreadable=True)
            replayed = phase.facts["replayed_events_after_restart_whole"]
            assert replayed >= sum(phase.facts["events_per_partition"]), phase.facts
    return phase


@pytest.fixture(scope="module")
async def baseline(infra: Infra, scale: Scale, log_dir: Path) -> Phase:
    return await run_phase(infra, scale, log_dir, 0)


async def test_memory_after_history(baseline: Phase, infra: Infra, scale: Scale, report: Report, log_dir: Path,
                                    kafka_ceiling: KafkaCeiling) -> None:  # fmt: skip
    runs = scale.history_runs
    history = await run_phase(infra, scale, log_dir, runs)
    events = sum(history.facts["events_per_partition"])
    base, load = baseline.memory["load"], f"{LOAD_RUNS} runs"
    for name in SERVICES:
        steady = report.ceilings[f"memory.{name}"] = Ceiling(
            f"memory.{name}", f"RSS {name} without history", base[name]["rss"], "MB"
        )
        peak = report.ceilings[f"memory.peak.{name}"] = Ceiling(
            f"memory.peak.{name}", f"peak RSS {name} without history", base[name]["peak"], "MB"
        )
        report.add("memory", f"RSS without history, after {load}: {name}", steady.value, "MB", target=MB300)
        report.add("memory", f"RSS after {runs:,}-run history: {name}", history.memory["replayed"][name]["rss"],
                   "MB", ceiling=steady.key, target=MB300)  # fmt: skip
        report.add("memory", f"RSS after {runs:,}-run history + {load}: {name}", history.memory["load"][name]["rss"],
                   "MB", ceiling=steady.key, target=MB300)  # fmt: skip
        report.add("memory", f"peak RSS (VmHWM) with {runs:,}-run history: {name}",
                   history.memory["load"][name]["peak"], "MB", ceiling=peak.key)  # fmt: skip
    grown = history.memory["load"]["executor"]["rss"] - base["executor"]["rss"]
    report.add("memory", "executor RSS growth per history run", grown * 2**20 / runs, "B/run",
               note=f"{grown:.0f} MB over {runs:,} runs")  # fmt: skip
    key = "executor start → every partition replayed"
    replay = history.seconds[key] - baseline.seconds[key]
    report.add("rebuild", f"executor start → {runs:,}-run history replayed", history.seconds[key], "s",
               note=f"{baseline.seconds[key]:.1f} s without history")  # fmt: skip
    restarted, base_restarted = history.memory["restarted"]["executor"], baseline.memory["restarted"]["executor"]
    report.add("rebuild", f"{RESTART}, {runs:,}-run history and a snapshot", history.seconds[RESTART], "s",
               target=Target("<=", 10, unit="s"),
               note=f"{history.facts['replayed_events_after_restart']:,.0f} events replayed; without history: "
                    f"start {baseline.seconds[key]:.1f} s, restart {baseline.seconds[RESTART]:.1f} s; replaying "
                    f"the history whole: restart {history.seconds[WHOLE_RESTART]:.1f} s, first start "
                    f"{history.seconds[key]:.1f} s; executor RSS after it {restarted['rss']:.0f} MB, "
                    f"{base_restarted['rss']:.0f} MB without history")  # fmt: skip
    report.add("rebuild", f"{WHOLE_RESTART}, {runs:,}-run history", history.seconds[WHOLE_RESTART], "s",
               note=f"{history.facts['replayed_events_after_restart_whole']:,.0f} events replayed, "
                    f"{history.facts['replay_seconds_after_restart_whole']:.1f} s replaying summed over partitions; "
                    f"executor RSS after it {history.memory['restarted whole']['executor']['rss']:.0f} MB")  # fmt: skip
    report.add("rebuild", f"executor restart, {runs:,}-run history and a snapshot: replay time, every partition",
               history.facts["replay_seconds_after_restart"], "s",
               note=f"summed over partitions; {history.facts['replay_seconds_whole']:.1f} s for the whole history, "
                    f"{baseline.facts['replay_seconds_after_restart']:.1f} s without history")  # fmt: skip
    report.add("memory", f"RSS after a restart on a {runs:,}-run history and a snapshot: executor",
               restarted["rss"], "MB", ceiling="memory.executor", target=MB300,
               note=f"{base_restarted['rss']:.0f} MB after a restart without history; "
                    f"peak {restarted['peak']:.0f} MB, {base_restarted['peak']:.0f} MB")  # fmt: skip
    report.add("rebuild", "executor: times the history was replayed by the end of the load",
               history.facts["replayed_events_after_load"] / events, "x", note="1 = no rebalance")  # fmt: skip
    report.add("rebuild", f"executor replay events/s, {events:,} events (startup without history taken off)",
               events / replay if replay > 0 else float("nan"), "events/s", ceiling="kafka.consume")  # fmt: skip
    key = "projector start → history projected"
    catch_up = history.seconds[key] - baseline.seconds[key]
    report.add("rebuild", f"projector catch-up on a {events:,}-event history (startup taken off)",
               events / catch_up if catch_up > 0 else float("nan"), "events/s", ceiling="kafka.consume",
               note="while the executor replays")  # fmt: skip
    report.details["memory_history"] = {
        "history_runs": runs, "history_events": events, "load_runs": LOAD_RUNS,
        "baseline": {"memory_mb": baseline.memory, "seconds": baseline.seconds, **baseline.facts},
        "history": {"memory_mb": history.memory, "seconds": history.seconds, **history.facts},
    }  # fmt: skip


START_ALONE = "executor alone: start → every partition replayed"


async def executor_alone(infra: Infra, scale: Scale, log_dir: Path, runs: int) -> Phase:
    """The executor by itself (no projector, API or ingest beside it) on a ledger of `runs` finished runs: its
    first start (a whole replay: no snapshot yet), then, once its snapshots are written, a SIGKILL and restart."""
    phase = Phase()
    async with bench_sandbox(infra, scale.partitions) as box:
        db = await connect(infra.database_url, box.schema)
        try:
            await write_history(box, runs, phase)
            logs = log_dir / ("alone-history" if runs else "alone-baseline")
            logs.mkdir(parents=True, exist_ok=True)
            stack = profiled(Stack.build(box, ("executor",), logs))
            ft = Flowtrail(box, stack, "", db)
            spawned = time.monotonic()
            stack["executor"].start()
            try:
                owned = await wait_until(lambda: executor_owns_all(ft), within=patience(scale), interval=0.1,
                                         what="executor start", on_timeout=ft.log_tails)  # fmt: skip
                phase.seconds[START_ALONE] = owned - spawned
                process = stack["executor"].process
                assert process is not None
                phase.facts["cpu_seconds_to_start"] = cpu_seconds(process.pid)
                phase.facts["replayed_events_at_start"] = await replayed_events(ft)
                phase.measure(ft, "started")
                await restart_executor(ft, scale, phase, snapshots=bool(runs))
            finally:
                stack.stop()
        finally:
            await db.close()
    if runs:
        assert phase.facts["replayed_events_at_start"] >= sum(phase.facts["events_per_partition"]), phase.facts
        assert phase.facts["replayed_events_after_restart"] < sum(phase.facts["events_per_partition"]), phase.facts
    return phase


async def test_executor_restart_alone(infra: Infra, scale: Scale, report: Report, log_dir: Path) -> None:
    """The issue's restart figure without the rest of the stack (its projector catching up on the history takes
    longest at 1,000,000 runs): the executor alone, without history and on the history, started then restarted.
    `-k restart_alone` runs only this."""
    runs = scale.history_runs
    base = await executor_alone(infra, scale, log_dir, 0)
    history = await executor_alone(infra, scale, log_dir, runs)
    restarted, base_restarted = history.memory["restarted"]["executor"], base.memory["restarted"]["executor"]
    report.add("rebuild", f"executor alone: restart → every partition replayed, {runs:,}-run history and a snapshot",
               history.seconds[RESTART], "s", target=Target("<=", 10, unit="s"),
               note=f"{history.facts['replayed_events_after_restart']:,.0f} events replayed; without history: start "
                    f"{base.seconds[START_ALONE]:.1f} s, restart {base.seconds[RESTART]:.1f} s; replaying the "
                    f"history whole (first start, no snapshot) {history.seconds[START_ALONE]:.1f} s; executor RSS "
                    f"after it {restarted['rss']:.0f} MB, {base_restarted['rss']:.0f} MB without history")  # fmt: skip
    report.add("rebuild", f"executor alone: CPU of the restart, {runs:,}-run history and a snapshot",
               history.facts["cpu_seconds_to_restart"], "s",
               note=f"{base.facts['cpu_seconds_to_restart']:.1f} s without history; load average "
                    f"{history.facts['load_at_restart']:.1f} and {base.facts['load_at_restart']:.1f} on "
                    f"{os.cpu_count()} cores at the two restarts")  # fmt: skip
    report.add("rebuild", f"{START_ALONE}, {runs:,}-run history (no snapshot: the whole replay)",
               history.seconds[START_ALONE], "s",
               note=f"{history.facts['replayed_events_at_start']:,.0f} events, "
                    f"{history.facts['cpu_seconds_to_start']:.0f} s of CPU; {base.seconds[START_ALONE]:.1f} s "
                    f"without history")  # fmt: skip
    report.add("memory", f"executor alone: RSS after a restart on a {runs:,}-run history and a snapshot",
               restarted["rss"], "MB", target=MB300,
               note=f"{base_restarted['rss']:.0f} MB after a restart without history; peak {restarted['peak']:.0f} MB, "
                    f"{base_restarted['peak']:.0f} MB without history; after the whole replay "
                    f"{history.memory['started']['executor']['rss']:.0f} MB")  # fmt: skip
    report.details["executor_restart_alone"] = {
        "history_runs": runs,
        "baseline": {"memory_mb": base.memory, "seconds": base.seconds, **base.facts},
        "history": {"memory_mb": history.memory, "seconds": history.seconds, **history.facts},
    }  # fmt: skip


async def test_executor_replay_memory_per_run(infra: Infra, scale: Scale, report: Report) -> None:
    """The executor's replay (Engine.assign) run here on one partition of a history: what it keeps per finished
    run, its peak per replayed event, and the allocation sites of both (tracemalloc)."""
    runs = scale.history_runs
    async with bench_sandbox(infra, scale.partitions) as box:
        template = finished_run(FLOW)
        per_partition = await produce_history(infra.kafka_bootstrap, box.topics.ledger, box.partitions, template,
                                              runs)  # fmt: skip
        settings = ExecutorSettings(
            kafka_bootstrap=infra.kafka_bootstrap, database_url=infra.database_url, database_schema=box.schema,
            topic_prefix=box.topics.prefix, partitions=box.partitions,
        )  # fmt: skip
        engine = Engine(settings, LedgerWriter(infra.kafka_bootstrap, box.topics.ledger, linger_ms=5),
                        FlowRegistry(infra.kafka_bootstrap, box.topics.flows))  # fmt: skip
        await engine.start()
        try:
            # Untraced first: the replay's own speed.
            started = time.perf_counter()
            await engine.assign([0])
            untraced_s = time.perf_counter() - started
            await engine.snapshotter.written()  # its snapshot's bytes are let go once written
            kept_before = len(engine.finished)
            # Then one more partition under tracemalloc: what stays after it, and the most held during it.
            gc.collect()
            tracemalloc.start(1)
            before = tracemalloc.take_snapshot()
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            await engine.assign([1])
            await engine.snapshotter.written()
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
            kept = tracemalloc.take_snapshot().compare_to(before, "lineno")
            tracemalloc.stop()
            traced_runs = len(engine.finished) - kept_before
        finally:
            await engine.close()
            await engine.flows.stop()
            await engine.ledger.stop()
    # Every history run of both partitions was folded to a finished run, none resumed.
    assert not engine.runs and len(engine.finished) == (per_partition[0] + per_partition[1]) // len(template)
    n0, n1 = per_partition[0], per_partition[1]
    report.add("rebuild", f"executor replay in-process (Engine.assign), {n0:,} events of one partition",
               n0 / untraced_s, "events/s", ceiling="kafka.consume")  # fmt: skip
    report.add("memory", "executor replay: kept per finished run (tracemalloc)", (current - base) / traced_runs,
               "B/run", note=f"{traced_runs:,} runs")  # fmt: skip
    report.add("memory", "executor replay: peak held per replayed event (tracemalloc)", (peak - base) / n1,
               "B/event", note=f"{n1:,} events, peak {(peak - base) / 2**20:.0f} MB")  # fmt: skip
    report.details["executor_replay_memory"] = {
        "events_per_partition": per_partition, "untraced_seconds_partition_0": untraced_s,
        "kept_bytes": current - base, "kept_runs": traced_runs, "peak_bytes": peak - base,
        "kept_by_line": [_stat(s) for s in kept[:8]],
    }  # fmt: skip


def _stat(s: Any) -> dict[str, Any]:
    """A tracemalloc Statistic or StatisticDiff as `dir/file.py:line`, bytes and blocks."""
    frame = s.traceback[0]
    where = "/".join(frame.filename.rsplit("/", 2)[-2:])
    return {"where": f"{where}:{frame.lineno}", "bytes": getattr(s, "size_diff", s.size),
            "blocks": getattr(s, "count_diff", s.count)}  # fmt: skip
