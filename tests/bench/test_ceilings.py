"""Raw ceilings: Kafka produce→consume, COPY into the read models, and the SQL behind `GET /v1/runs`."""

from __future__ import annotations

import time
from typing import Any

from services.api.adapters.runs import Cursor, RunFilter, Sort, list_runs
from services.common.db import connect
from tests.bench.ceilings import CopyCeiling, KafkaCeiling, list_query, sql_latency
from tests.bench.loaders import RUN_COLUMNS, bench_sandbox, copy_rows, synthetic_runs
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra


async def test_raw_kafka_produce_then_consume(kafka_ceiling: KafkaCeiling) -> None:
    assert kafka_ceiling.round_trip_rate > 0


async def test_raw_copy_into_the_read_models(copy_ceiling: CopyCeiling) -> None:
    assert copy_ceiling.mixed_rate > 0


async def test_raw_sql_of_the_runs_list(infra: Infra, scale: Scale, report: Report) -> None:
    """Seeded `runs`, then each query shape exactly as the API builds it, timed without HTTP."""
    async with bench_sandbox(infra, partitions=1) as box:
        conn = await connect(infra.database_url, box.schema)
        try:
            started = time.perf_counter()
            for chunk in synthetic_runs(scale.list_seed_runs, tenant_ids=("t1", "t1", "t1", "t2")):
                await copy_rows(conn, "runs", RUN_COLUMNS, chunk, box.schema)
            await conn.execute("ANALYZE runs")
            seeded_s = time.perf_counter() - started
            everyone = RunFilter(tenant_id="t1", environment="PRODUCTION")
            newest = Sort.parse("-created_at")
            middle = await conn.fetchrow(
                "SELECT created_at, id FROM runs WHERE tenant_id = 't1' AND environment = 'PRODUCTION' "
                "ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
                scale.list_seed_runs // 3,
            )
            shapes = {
                "first page": (everyone, None),
                "flow+status filter": (RunFilter("t1", "PRODUCTION", flow_ids=["flow-03"], statuses=["FAILED"]), None),
                "deep cursor page": (everyone, Cursor(str(newest), middle["created_at"], middle["id"])),
            }
            timings: dict[str, dict[str, Any]] = {}
            for name, (flt, cursor) in shapes.items():
                sql, args = await list_query(conn, lambda pool: list_runs(pool, flt, 20, newest, cursor))  # noqa: B023
                timings[name] = await sql_latency(conn, sql, args, scale.query_samples)
                plan = await conn.fetch("EXPLAIN " + sql, *args)
                timings[name]["plan"] = [r[0] for r in plan]
                key = name.replace(" ", "_").replace("+", "_")
                for q in ("p50", "p99"):
                    report.add_ceiling(f"sql.runs_list.{key}.{q}", f"raw SQL runs list, {name}, {q}",
                                       timings[name][f"{q}_ms"], "ms")  # fmt: skip
        finally:
            await conn.close()
    report.details["runs_list_sql"] = {
        "seeded_runs": scale.list_seed_runs, "seed_copy_rows_per_s": scale.list_seed_runs / seeded_s,
        "limit": 20, "shapes": timings,
    }  # fmt: skip
    assert all(t["samples"] == scale.query_samples for t in timings.values())
