"""Runs API queries at a million runs (FLOWTRAIL_BENCH_SCALE=full: ten million), each against its own raw SQL.

Rows go straight into the read models with COPY; the API process serves them. For every query shape the
same statement the API sends is timed directly on one connection (the raw ceiling), then the HTTP
endpoint is timed one request at a time (p50/p99) and with 16 requests in flight (requests/s).

The load comes from aiohttp's client: httpx costs about 1 ms of CPU per request, so on two cores it could not
send more than ~500 requests/s to an endpoint that does nothing. What the client itself manages is measured
too, on GET /healthz, and reported beside the figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from services.api.adapters.runs import Cursor, RunFilter, Sort, get_run_detail, list_runs
from services.common.db import connect
from tests.bench.loaders import STEP_COLUMNS, bench_sandbox, copy_rows, seed_runs
from tests.bench.measure import percentile
from tests.bench.report import Report, Target
from tests.bench.scale import Scale
from tests.conftest import Infra
from tests.e2e.stack import Stack

RARE = "currency XQZ is not supported by the ledger"
# Record errors (RecordFailed) and a failed step's upstream body, in runs.search_details as the projector folds them
# (migration 0024's search_fold): one refusal on every PARTIAL run, a rare one on a handful, and
# the OAuth body of every "401 Unauthorized" failure.
REFUSED = "Please enter value(s) for: Email"
REFUSED_RARE = "Please enter value(s) for: Tax Registration XQW"
_SEED_RECORD_ERRORS = """
UPDATE runs SET search_details = search_fold(search_details, ARRAY[jsonb_build_object('type', 'RecordFailed',
    'payload', jsonb_build_object('error', $1::text, 'raw_error', jsonb_build_object('status', 400,
        'body', jsonb_build_object('o:errorDetails', jsonb_build_array(jsonb_build_object(
            'detail', $1::text, 'o:errorPath', 'email', 'o:errorCode', 'USER_ERROR',
            'record', 'c-' || right(id, 6)))))))])
WHERE {where}
"""
_SEED_BODIES = """
UPDATE runs SET search_details = search_fold(search_details, ARRAY[jsonb_build_object('type', 'StepFailed',
    'payload', jsonb_build_object('output', jsonb_build_object('status', 401, 'body', jsonb_build_object(
        'error', 'invalid_token', 'error_description', 'The access token expired', 'request_id', right(id, 12)))))])
WHERE error_message LIKE '401 Unauthorized%'
"""
CONCURRENCY = 16


class _Recorder:
    """Stands in for the API's pool: runs each statement once and remembers it, to be timed raw afterwards."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetchrow(sql, *args)


async def _raw_latency(conn: Any, statements: list[tuple[str, tuple[Any, ...]]], samples: int) -> dict[str, Any]:
    """p50/p99 ms of the API's statements for one request, run back to back on one connection."""
    for _ in range(min(20, samples)):
        for sql, args in statements:
            await conn.fetch(sql, *args)
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        for sql, args in statements:
            await conn.fetch(sql, *args)
        times.append((time.perf_counter() - started) * 1000)
    plans = [[r[0] for r in await conn.fetch("EXPLAIN " + sql, *args)] for sql, args in statements]
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "plans": plans}


async def _whole_run(pool: Any, run_id: str) -> None:
    # GET /v1/runs/{id} sends this one statement.
    await get_run_detail(pool, "t1", "PRODUCTION", run_id)


async def _get(client: aiohttp.ClientSession, path: str, params: dict[str, Any]) -> tuple[int, bytes]:
    async with client.get(path, params=params) as r:
        return r.status, await r.read()


async def _http_latency(client: aiohttp.ClientSession, path: str, params: dict[str, Any], samples: int
                        ) -> dict[str, float]:  # fmt: skip
    for _ in range(min(20, samples)):
        assert (await _get(client, path, params))[0] == 200
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        status, body = await _get(client, path, params)
        times.append((time.perf_counter() - started) * 1000)
        assert status == 200, body
    # Twice the samples in flight: long enough (~1 s) that one scheduling hiccup does not decide the figure.
    per_worker = max(2 * samples // CONCURRENCY, 5)

    async def worker() -> None:
        for _ in range(per_worker):
            assert (await _get(client, path, params))[0] == 200

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    rps = per_worker * CONCURRENCY / (time.perf_counter() - started)
    return {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "p99_ms": percentile(times, 99),
            "rps": rps}  # fmt: skip


async def test_runs_api_queries_at_scale(infra: Infra, scale: Scale, report: Report, log_dir: Path) -> None:
    n = scale.query_runs
    async with bench_sandbox(infra, partitions=1) as box:
        conn = await connect(infra.database_url, box.schema)
        try:
            started = time.perf_counter()
            key = await seed_runs(conn, box.schema, n, tenant_ids=("t1", "t1", "t1", "t2"))
            # A rare error on a handful of runs, and one run with 20 steps to fetch.
            await conn.execute(
                "UPDATE runs SET error_message = $1, status = 'FAILED' WHERE id IN "
                "(SELECT id FROM runs WHERE tenant_id = 't1' AND environment = 'PRODUCTION' ORDER BY id LIMIT 7)",
                RARE,
            )
            await conn.execute(_SEED_RECORD_ERRORS.format(where="status = 'PARTIAL'"), REFUSED)
            await conn.execute(
                _SEED_RECORD_ERRORS.format(where="id IN (SELECT id FROM runs WHERE tenant_id = 't1' AND environment = "
                                           "'PRODUCTION' ORDER BY id DESC LIMIT 7)"),
                REFUSED_RARE,
            )  # fmt: skip
            await conn.execute(_SEED_BODIES)
            searchable = await conn.fetchval("SELECT count(*) FROM runs WHERE search_details IS NOT NULL")
            big = await conn.fetchval(
                "SELECT id FROM runs WHERE tenant_id = 't1' AND environment = 'PRODUCTION' ORDER BY created_at DESC "
                "OFFSET 1000 LIMIT 1"
            )
            now = datetime.now(UTC)
            steps = [
                (big, f"step{i:02d}", i, "http_request", "SUCCEEDED", 1, {"url": f"https://x.example.com/{i}"},
                 {"status": 200, "body": {"ok": True, "i": i}}, None, now, now + timedelta(milliseconds=5), 5.0)
                for i in range(20)
            ]  # fmt: skip
            await copy_rows(conn, "run_steps", STEP_COLUMNS, steps, box.schema)
            await conn.execute("ANALYZE")
            seeded_s = time.perf_counter() - started

            newest = Sort.parse("-created_at")
            middle = await conn.fetchrow(
                "SELECT created_at, id FROM runs WHERE tenant_id = 't1' AND environment = 'PRODUCTION' "
                "ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
                n // 3,
            )
            deep = Cursor(str(newest), middle["created_at"], middle["id"])
            everyone = RunFilter("t1", "PRODUCTION")
            Call = Callable[[Any], Awaitable[object]]

            def search(q: str) -> tuple[Call, str, dict[str, Any]]:
                """The first page of t1's runs matching `q`: in SQL and through GET /v1/runs?q=."""
                return (
                    lambda pool: list_runs(pool, RunFilter("t1", "PRODUCTION", q=q), 20, newest),
                    "/v1/runs",
                    {"q": q},
                )

            shapes: dict[str, tuple[Call, str, dict[str, Any]]] = {
                "list, first page": (lambda pool: list_runs(pool, everyone, 20, newest), "/v1/runs", {}),
                "list, flow + status": (
                    lambda pool: list_runs(
                        pool, RunFilter("t1", "PRODUCTION", flow_ids=["flow-03"], statuses=["FAILED"]), 20, newest
                    ),
                    "/v1/runs",
                    {"flow_id": "flow-03", "status": "FAILED"},
                ),
                "list, deep cursor page": (
                    lambda pool: list_runs(pool, everyone, 20, newest, deep),
                    "/v1/runs",
                    {"cursor": deep.encode()},
                ),
                "search, rare substring": search("XQZ is not"),
                "search, common substring": search("upstream unavailable"),
                "search, record error, rare": search("Tax Registration XQW"),
                "search, record error, common": search("value(s) for: Email"),
                "search, upstream 401 body": search("access token expired"),
                "get run with 20 steps": (lambda pool: _whole_run(pool, big), f"/v1/runs/{big}", {}),
            }
            raw: dict[str, dict[str, Any]] = {}
            for name, (call, _, _) in shapes.items():
                recorder = _Recorder(conn)
                await call(recorder)
                raw[name] = await _raw_latency(conn, recorder.statements, scale.query_samples)
        finally:
            await conn.close()

        stack = Stack.build(box, ("api",), log_dir)
        await stack.start()
        try:
            headers = {"Authorization": f"Bearer {key}"}
            # Idle connections expire on the client before uvicorn's 5 s keep-alive timeout closes them under it.
            connector = aiohttp.TCPConnector(limit=CONCURRENCY, keepalive_timeout=2)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(stack["api"].url, headers=headers, connector=connector,
                                             timeout=timeout) as api:  # fmt: skip
                found = orjson.loads((await _get(api, "/v1/runs", {"q": "XQZ is not", "limit": 100}))[1])["data"]
                assert len(found) == 7
                found = orjson.loads((await _get(api, "/v1/runs", {"q": "Tax Registration XQW", "limit": 100}))[1])
                assert len(found["data"]) == 7
                detail = orjson.loads((await _get(api, f"/v1/runs/{big}", {}))[1])
                assert len(detail["steps"]) == 20
                client = await _http_latency(api, "/healthz", {}, scale.query_samples)
                http = {name: await _http_latency(api, path, params, scale.query_samples)
                        for name, (_, path, params) in shapes.items()}  # fmt: skip
        finally:
            stack.stop()

    label = f"{n / 1e6:g}M runs" if n >= 1_000_000 else f"{n:,} runs"
    for name in shapes:
        key = "query." + name.replace(", ", "_").replace(" ", "_").replace("+", "")
        report.add_ceiling(f"{key}.raw_p99", f"raw SQL p99, {name} ({label})", raw[name]["p99_ms"], "ms")
        p99 = http[name]["p99_ms"]
        # The product target: API p99 at most 2x raw p99 + 2 ms.
        bound = 2 * raw[name]["p99_ms"] + 2
        report.add("query", f"API p99, {name} ({label})", p99, "ms", ceiling=f"{key}.raw_p99",
                   target=Target("<=", round(bound, 2), unit="ms"))  # fmt: skip
        report.add("query", f"API p50, {name}", http[name]["p50_ms"], "ms")
        report.add("query", f"API requests/s, {name}, {CONCURRENCY} in flight", http[name]["rps"], "req/s",
                   target=Target(">=", 1000, unit="req/s") if name.startswith("list") else None)  # fmt: skip
    # No auth, no SQL: the most this client and the bare HTTP stack reach here.
    report.add("query", f"GET /healthz requests/s, {CONCURRENCY} in flight (client ceiling)", client["rps"], "req/s")
    report.add("query", "GET /healthz p50 (client ceiling)", client["p50_ms"], "ms")
    report.add("query", f"API p95, search rare substring ({label})", http["search, rare substring"]["p95_ms"], "ms",
               target=Target("<=", 25, unit="ms"))  # fmt: skip
    report.add("query", f"API p95, search record error rare substring ({label})",
               http["search, record error, rare"]["p95_ms"], "ms", target=Target("<=", 25, unit="ms"))  # fmt: skip
    report.add("query", f"API p95, search record error common substring ({label})",
               http["search, record error, common"]["p95_ms"], "ms", target=Target("<=", 25, unit="ms"))  # fmt: skip
    report.add("query", f"runs with search details (record errors, upstream bodies) of {n:,}", searchable, "runs")
    report.details["queries"] = {"runs": n, "seed_seconds": seeded_s, "raw": raw, "http": http, "client": client}
    report.details["queries"]["searchable_runs"] = searchable
