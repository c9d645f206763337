"""The shared admission (docs/architecture.md, Admission): admissions per second of one tenant's limited runs — each
an `admit_run` and a `release_run`, from four concurrent callers as the runs of two executors ask — against the
raw ceiling of the same number of committed single-row writes with the WAL flushed on every commit, and against
plain `SELECT 1` round trips, on the same PostgreSQL in the same run."""

from __future__ import annotations

import asyncio
import time

from services.common.db import connect
from services.executor.adapters.slots import SharedSlots
from tests.bench.loaders import bench_sandbox
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra

CALLERS = 4


async def test_admissions_per_second_of_one_tenant_against_raw_round_trips(
    infra: Infra, scale: Scale, report: Report
) -> None:
    pairs = max(200, scale.kafka_messages // 50)
    async with bench_sandbox(infra, partitions=1) as box:
        conn = await connect(infra.database_url, box.schema)
        slots = SharedSlots(infra.database_url, box.schema)
        try:
            await conn.execute("CREATE TABLE bench_commits (id text PRIMARY KEY)")
            began = time.perf_counter()
            for _ in range(pairs):
                await conn.execute("SELECT 1")
            round_trips = pairs / (time.perf_counter() - began)
            began = time.perf_counter()
            for i in range(pairs):
                await conn.execute("INSERT INTO bench_commits VALUES ($1)", str(i))
            flushed_commits = pairs / (time.perf_counter() - began)

            await slots.admit("warm", "t1", "f", 0, flow_limit=None, tenant_limit=10**9, waiting=False)

            async def caller(c: int) -> None:
                for i in range(pairs // CALLERS):
                    run = f"run-{c}-{i}"
                    answer = await slots.admit(run, "t1", "f", c, flow_limit=10**6, tenant_limit=10**9, waiting=False)
                    assert answer.outcome == "granted"
                    await slots.release(run, "t1", "f")

            began = time.perf_counter()
            await asyncio.gather(*(caller(c) for c in range(CALLERS)))
            admissions = (pairs // CALLERS * CALLERS) / (time.perf_counter() - began)
        finally:
            await slots.close()
            await conn.close()
    report.add_ceiling("pg.round_trip", "raw PostgreSQL SELECT 1 round trips, one connection", round_trips, "/s")
    report.add_ceiling("pg.flushed_commit", "raw PostgreSQL one-row commits, WAL flushed each", flushed_commits, "/s")
    report.add("throughput", "shared admission: admit + release of one tenant, 4 callers", admissions, "pairs/s",
               ceiling="pg.flushed_commit",
               note=f"{admissions / round_trips:.2f} of raw SELECT 1 round trips")  # fmt: skip
    assert admissions > 0
