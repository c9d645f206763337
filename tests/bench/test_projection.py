"""Projection: drain a ledger backlog into the read models; rows/s against raw COPY of the same rows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from schemas import codec
from services.common.db import connect
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.bench.ceilings import CopyCeiling, KafkaCeiling
from tests.bench.load import profiled
from tests.bench.loaders import bench_sandbox
from tests.bench.measure import percentile, prometheus_values, wait_until
from tests.bench.procstat import CpuMeter, postgres_pids
from tests.bench.report import Report, Target
from tests.bench.scale import Scale
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import Stack
from tests.factories import produce, run_events


async def test_projector_drains_a_ledger_backlog(
    infra: Infra, scale: Scale, report: Report, log_dir: Path, copy_ceiling: CopyCeiling, kafka_ceiling: KafkaCeiling
) -> None:
    runs, steps = scale.projection_runs, scale.steps
    async with bench_sandbox(infra, scale.partitions) as box:
        events = [e for i in range(runs) for e in run_events(f"run{i:08d}", steps=steps)]
        total = len(events)
        await produce(infra.kafka_bootstrap, box.topics.ledger, events, box.partitions)
        del events
        db = await connect(infra.database_url, box.schema)
        stack = profiled(Stack.build(box, ("projector",), log_dir))
        try:
            await stack.start()
            meter = CpuMeter({"projector": [stack["projector"].process.pid], "postgres (all)": postgres_pids()})  # type: ignore[union-attr]
            meter.start()

            async def projected() -> int:
                sql = "SELECT coalesce(sum(next_offset), 0) FROM projector_offsets WHERE topic = $1"
                return int(await db.fetchval(sql, box.topics.ledger))

            # Offsets are stored in the same transaction as the rows: they count committed events exactly.
            first = 0

            async def started() -> bool:
                nonlocal first
                first = await projected()
                return first > 0

            tail = stack["projector"].log_tail
            t0 = await wait_until(started, within=scale.timeout_s, interval=0.005, what="first projected batch",
                                  on_timeout=tail)  # fmt: skip

            async def drained() -> bool:
                return await projected() >= total

            t1 = await wait_until(drained, within=scale.timeout_s, interval=0.02, what="projection", on_timeout=tail)
            cpu = meter.stop()
            tables = ("run_events", "runs", "run_steps")
            counts = {t: int(await db.fetchval(f"SELECT count(*) FROM {t}")) for t in tables}
            async with aiohttp.ClientSession() as s, s.get(stack["projector"].url + "/metrics") as r:
                metrics = prometheus_values(await r.text())
            visible_ms = await _terminal_to_visible(infra, box, db, min(scale.latency_runs, 100))
        finally:
            stack.stop()
        await db.close()
        # Rebuild: `flowtrail projector verify` replays the same ledger into a shadow schema and compares.
        settings = ProjectorSettings(
            kafka_bootstrap=infra.kafka_bootstrap, database_url=infra.database_url, database_schema=box.schema,
            topic_prefix=box.topics.prefix,
        )  # fmt: skip
        progress: list[str] = []
        outcome = await rebuild.run(settings, swap=False, progress=progress.append)
    assert counts == {"run_events": total, "runs": runs, "run_steps": runs * steps}, counts

    seconds = t1 - t0
    events_per_s = (total - first) / seconds
    rows_per_event = sum(counts.values()) / total
    report.add("projection", f"projector events/s, backlog of {total:,}", events_per_s, "events/s",
               ceiling="kafka.consume")  # fmt: skip
    report.add("projection", "projector read-model rows/s", events_per_s * rows_per_event, "rows/s",
               ceiling="copy.mix", target=Target(">=", 0.3, on="ratio"))  # fmt: skip
    report.add("cpu", "projector CPU while draining", cpu["projector"], "% core")
    for q in (50, 99):
        report.add("latency", f"projector idle: terminal event acked → visible in runs p{q}, {len(visible_ms)} runs",
                   percentile(visible_ms, q), "ms")  # fmt: skip
    assert outcome.comparison.equal, outcome.comparison.differing_tables
    report.add("rebuild", f"projector verify (replay into a shadow schema) events/s, {outcome.events:,} events",
               outcome.events / outcome.seconds, "events/s", ceiling="kafka.consume",
               target=Target(">=", 0.15, on="ratio"))  # fmt: skip
    db_s = metrics.get("flowtrail_projector_batch_seconds_sum", float("nan"))
    report.details["projection"] = {
        "events": total, "runs": runs, "steps_per_run": steps, "rows": counts, "measured_from_event": first,
        "seconds": seconds, "cpu_percent_of_core": cpu,
        "batches": metrics.get("flowtrail_projector_batch_seconds_count"),
        # Share of the drain spent inside the batch transaction (SQL); the rest is fetch + decode + fold.
        "transaction_seconds": db_s, "transaction_share": db_s / seconds if seconds else None,
        # verify's seconds step by step (the events/s above count from the replay's start to the shadow's checksums).
        "verify_seconds": outcome.seconds, "verify_phases": outcome.phases,
    }  # fmt: skip


async def _terminal_to_visible(infra: Infra, box: Sandbox, db: asyncpg.Connection, count: int) -> list[float]:
    """One 1-step run at a time on an idle projector: ms from the broker acknowledging the run's terminal event to
    the run's final status in `runs` (its earlier events are projected first)."""
    producer = AIOKafkaProducer(bootstrap_servers=infra.kafka_bootstrap, acks="all")
    await producer.start()
    out: list[float] = []
    try:
        for i in range(count):
            run_id = f"idle{i:06d}"
            events = run_events(run_id, steps=1)
            partition = hash(run_id) % box.partitions
            for e in events:
                if e is events[-1]:
                    seen = events[-2].seq

                    async def before_terminal(seq: int = seen, rid: str = run_id) -> bool:
                        return await db.fetchval("SELECT last_seq FROM runs WHERE id = $1", rid) == seq

                    await wait_until(before_terminal, within=30, interval=0.005, what="run before its terminal event")
                await producer.send_and_wait(box.topics.ledger, codec.dumps(e), key=run_id.encode(),
                                             partition=partition)  # fmt: skip
            acked = time.perf_counter()
            while await db.fetchval("SELECT status FROM runs WHERE id = $1", run_id) != "SUCCEEDED":
                if time.perf_counter() - acked > 30:
                    raise AssertionError(f"run {run_id} not visible as SUCCEEDED 30 s after its terminal event")
                await asyncio.sleep(0.001)
            out.append((time.perf_counter() - acked) * 1000)
    finally:
        await producer.stop()
    return out
