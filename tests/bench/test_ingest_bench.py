"""Ingest alone: single-input triggers per second, ingest's CPU per request and the 202's latency, next to the raw
ceilings of the same run (a raw produce with the appender's producer settings, raw asyncpg round trips).

Only ingest runs: the flow is written straight into the `flows` read model, so what is measured is the trigger
route's own work — authentication, the rate-limit check (on, but never binding: tests/e2e/stack.py), the flow
lookup, the append to Kafka (acks=all) and the placeholder row — with `concurrency` requests in flight.
`FLOWTRAIL_BENCH_PROFILE=ingest` runs it under cProfile (tests/bench/load.py), the stats beside its log.

`FLOWTRAIL_BENCH_INGEST_BASELINE=<another checkout>` (e.g. a `git worktree` of an older commit) also runs that
checkout's ingest, over a sandbox of its own, and sends the triggers to the two in alternating rounds, so both see
the same machine load: each figure is then reported for both, with the ratio of this tree's to the baseline's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import orjson
import pytest

from deploy.launcher.supervisor import ServiceSpec, open_child_log, spawn_options
from services.common import kafka, ratelimit
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect, create_pool, keep_session
from services.common.ratelimit import BLOCK_LEASE_S
from services.ingest.settings import IngestSettings
from tests.bench.load import TENANT, profiled
from tests.bench.loaders import bench_sandbox
from tests.bench.measure import percentile
from tests.bench.procstat import cpu_seconds
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import Service, Stack

# Triggers per scale (the presets are shared; this benchmark sizes itself by their name).
TRIGGERS = {"smoke": 3_000, "default": 10_000, "full": 40_000}
ROUNDS = 6  # alternating rounds when a baseline runs beside this tree
FLOW = "bench-ingest"
WARMUP = 100
BASELINE_ENV = "FLOWTRAIL_BENCH_INGEST_BASELINE"


@dataclass
class Side:
    """One ingest under load: its sandbox, process, key, and what it measured."""

    name: str
    box: Sandbox
    service: Service
    key: str
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def pid(self) -> int:
        assert self.service.process is not None
        return self.service.process.pid


async def test_single_input_triggers_against_raw_produce_and_round_trips(
    sides: list[Side], scale: Scale, report: Report
) -> None:
    n, k = TRIGGERS.get(scale.name, TRIGGERS["default"]), scale.concurrency
    box = sides[0].box
    produce = await _raw_produce(box.infra.kafka_bootstrap, box.topics.triggers, n, k)
    round_trips = await _raw_round_trips(box, n, k)
    report.add_ceiling("ingest.raw_produce", f"raw Kafka produce, one record awaited each, {k} in flight", produce,
                       "msg/s")  # fmt: skip
    report.add_ceiling("ingest.raw_round_trip", f"raw asyncpg SELECT 1 round trips, {k} in flight", round_trips,
                       "q/s")  # fmt: skip

    sessions = {s.name: _session(s, k) for s in sides}
    try:
        for side in sides:
            await _first_accepted(sessions[side.name], side.url)  # the producer's metadata, fetched by the first append
            await _send(sessions[side.name], side, WARMUP, k)  # connections, the key cache
            side.latencies.clear()
        rounds = ROUNDS if len(sides) > 1 else 1
        for r in range(rounds):
            for side in sides if r % 2 == 0 else reversed(sides):
                count = n // rounds
                before = cpu_seconds(side.pid) or 0.0
                started = time.perf_counter()
                await _send(sessions[side.name], side, count, k)
                side.wall_s += time.perf_counter() - started
                side.cpu_s += (cpu_seconds(side.pid) or 0.0) - before
                side.sent += count
    finally:
        for session in sessions.values():
            await session.close()

    figures: dict[str, dict[str, float]] = {}
    for side in sides:
        placeholders, upserts = await _count_runs(side.box)
        assert placeholders == side.sent + WARMUP + 1, f"benchmark harness: every 202 has its placeholder row: {side}"
        figures[side.name] = {
            "triggers_per_s": side.sent / side.wall_s, "ingest_cpu_ms_per_request": side.cpu_s / side.sent * 1000,
            "p50_ms": percentile(side.latencies, 50) * 1000, "p99_ms": percentile(side.latencies, 99) * 1000,
            "rate_limit_upserts_per_request": upserts / placeholders,
        }  # fmt: skip
    ours = figures["this tree"]
    label = f"({sides[0].sent:,}, {k} in flight)"
    report.add("throughput", f"ingest alone: single-input triggers accepted/s {label}", ours["triggers_per_s"],
               "triggers/s", ceiling="ingest.raw_produce")  # fmt: skip
    report.add("cpu", "ingest alone: ingest CPU per trigger request", ours["ingest_cpu_ms_per_request"], "ms")
    report.add("cpu", "ingest alone: rate-limit upserts per trigger request", ours["rate_limit_upserts_per_request"],
               "upserts")  # fmt: skip
    report.add("latency", "ingest alone: trigger → 202 p50", ours["p50_ms"], "ms")
    report.add("latency", "ingest alone: trigger → 202 p99", ours["p99_ms"], "ms")
    report.details["ingest_alone"] = {"triggers": n, "in_flight": k, "raw_produce_per_s": produce,
                                      "raw_round_trips_per_s": round_trips, **figures}  # fmt: skip
    print(f"\nraw produce {produce:.0f} msg/s, raw round trips {round_trips:.0f}/s")
    for name, f in figures.items():
        print(f"ingest alone, {name}: {f['triggers_per_s']:.0f} triggers/s, {f['ingest_cpu_ms_per_request']:.3f} ms "
              f"ingest CPU/request, p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, "
              f"{f['rate_limit_upserts_per_request']:.3f} rate-limit upserts/request")  # fmt: skip
    if "baseline" in figures:
        ratios = {name: ours[name] / figures["baseline"][name] for name in ours if figures["baseline"][name]}
        report.details["ingest_alone"]["this_tree_over_baseline"] = ratios
        print("this tree / baseline: " + ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()))


async def test_rate_limit_check_cpu_against_the_baselines(infra: Infra, scale: Scale, report: Report) -> None:
    """The rate limiter alone, in this process: `concurrency` tasks hitting one key whose limit never binds, this
    tree's RateLimiter and (with FLOWTRAIL_BENCH_INGEST_BASELINE) the baseline checkout's, in alternating rounds over
    one pool: this process's CPU and the pool's PostgreSQL backends' CPU per check, and checks per second."""
    n, k = TRIGGERS.get(scale.name, TRIGGERS["default"]) * 2, scale.concurrency
    modules: dict[str, ModuleType] = {"this tree": ratelimit}
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_ratelimit",
                                                      Path(baseline) / "services/common/ratelimit.py")  # fmt: skip
        assert spec is not None and spec.loader is not None
        modules["baseline"] = sys.modules["baseline_ratelimit"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["baseline"])
    async with bench_sandbox(infra, partitions=1) as box:
        pool = await create_pool(infra.database_url, box.schema, min_size=10, max_size=10, reset=keep_session)
        try:
            held = [await pool.acquire() for _ in range(10)]
            backends = [int(await c.fetchval("SELECT pg_backend_pid()")) for c in held]
            for c in held:
                await pool.release(c)
            figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in modules}
            for r in range(4):
                for name in list(modules) if r % 2 == 0 else reversed(list(modules)):
                    mod = modules[name]
                    limiter = mod.RateLimiter(pool, mod.Limits(triggers=10**9))
                    counter = iter(range(n))

                    async def worker(limiter: Any = limiter, key: str = f"key-{name}-{r}",
                                     counter: Iterator[int] = counter) -> None:  # fmt: skip
                        for _ in counter:
                            assert (await limiter.hit(key, "triggers")).admitted

                    pg0, cpu0, wall0 = _cpu(backends), time.process_time(), time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(k)))
                    wall, cpu, pg = time.perf_counter() - wall0, time.process_time() - cpu0, _cpu(backends) - pg0
                    figures[name].append((cpu / n * 1e6, pg / n * 1e6, n / wall))
                    await asyncio.sleep(BLOCK_LEASE_S * 2)  # blocks given back before the next round
        finally:
            await pool.close()
    medians = {name: [statistics.median(f[i] for f in rows) for i in range(3)] for name, rows in figures.items()}
    ours = medians["this tree"]
    report.add("cpu", f"rate-limit check: client CPU per check ({k} tasks, one key)", ours[0], "us")
    report.add("cpu", "rate-limit check: PostgreSQL CPU per check", ours[1], "us")
    report.add("throughput", "rate-limit check: checks/s, one process", ours[2], "checks/s")
    report.details["rate_limit_check"] = {"checks": n, "tasks": k, "rounds": figures}
    for name, (cpu_us, pg_us, rate) in medians.items():
        print(f"\nrate-limit check, {name}: {cpu_us:.1f} us client CPU, {pg_us:.1f} us PostgreSQL CPU per check, "
              f"{rate:.0f} checks/s (medians of {len(figures[name])} rounds)")  # fmt: skip
    if "baseline" in medians:
        base = medians["baseline"]
        print(f"this tree / baseline: client CPU {ours[0] / base[0]:.3f}, PostgreSQL CPU "
              f"{ours[1] / max(base[1], 1e-9):.3f}, checks/s {ours[2] / base[2]:.3f}")  # fmt: skip


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def _session(side: Side, k: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=k),
        headers={"Authorization": f"Bearer {side.key}", "Content-Type": "application/json"},
    )


async def _send(session: aiohttp.ClientSession, side: Side, count: int, k: int) -> None:
    """`count` single-input triggers, `k` in flight at all times (closed loop), each one's latency recorded."""
    counter = iter(range(count))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            async with session.post(f"{side.url}/v1/flows/{FLOW}/trigger", data=orjson.dumps({"input": {"n": i}})) as r:
                body = await r.read()
                assert r.status == 202, f"benchmark harness: {side.name} answered {r.status}: {body[:300]!r}"
            side.latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(k)))


async def _first_accepted(session: aiohttp.ClientSession, url: str) -> None:
    """One trigger, retried while Kafka answers 503 (a producer's first metadata fetch on a busy broker)."""
    deadline = time.monotonic() + 60
    while True:
        async with session.post(f"{url}/v1/flows/{FLOW}/trigger", data=orjson.dumps({"input": {"n": -1}})) as r:
            body = await r.read()
            if r.status == 202:
                return
            assert r.status == 503 and time.monotonic() < deadline, f"benchmark harness: {r.status}: {body[:300]!r}"
        await asyncio.sleep(0.5)


@dataclass
class BaselineService(Service):
    """Ingest run from another checkout (its own `services` package), otherwise as the stack runs it."""

    checkout: Path = Path()

    def start(self) -> None:
        spec = ServiceSpec.service(self.name, {**os.environ, **self.env})
        spec = ServiceSpec(name=spec.name, argv=spec.argv, env=spec.env, cwd=self.checkout)
        log_fd = open_child_log(self.log_path, spec)
        try:
            self.process = subprocess.Popen(spec.argv, **spawn_options(spec, log_fd))
        finally:
            os.close(log_fd)


@pytest.fixture(scope="module")
async def sides(infra: Infra, scale: Scale, log_dir: Path) -> AsyncIterator[list[Side]]:
    """This tree's ingest, and the baseline checkout's when FLOWTRAIL_BENCH_INGEST_BASELINE names one."""
    baseline = os.environ.get(BASELINE_ENV)
    async with AsyncExitStack() as stack:
        out = [await stack.enter_async_context(_ingest_alone(infra, scale, log_dir, "this tree", None))]
        if baseline:
            out.append(
                await stack.enter_async_context(_ingest_alone(infra, scale, log_dir, "baseline", Path(baseline)))
            )
        yield out


@asynccontextmanager
async def _ingest_alone(infra: Infra, scale: Scale, log_dir: Path, name: str,
                        checkout: Path | None) -> AsyncIterator[Side]:  # fmt: skip
    """Ingest alone over a fresh sandbox holding one active flow."""
    async with bench_sandbox(infra, scale.partitions) as box:
        db = await connect(infra.database_url, box.schema)
        try:
            await ensure_tenant(db, TENANT, "Benchmarks")
            _, key = await create_api_key(db, TENANT)
            now = datetime.now(UTC)
            definition = {"id": FLOW, "tenant_id": TENANT, "name": FLOW, "version": 1, "trigger": {"type": "api"},
                          "steps": [{"name": "s0", "action": "transform", "input": {"output": {"i": 0}}}]}  # fmt: skip
            await db.execute(
                "INSERT INTO flows (tenant_id, id, name, latest_version, environment, trigger_type, created_at, "
                "updated_at) VALUES ($1, $2, $2, 1, 'PRODUCTION', 'api', $3, $3)", TENANT, FLOW, now,
            )  # fmt: skip
            await db.execute(
                "INSERT INTO flow_versions (tenant_id, flow_id, version, definition, published_at) "
                "VALUES ($1, $2, 1, $3, $4)", TENANT, FLOW, definition, now,
            )  # fmt: skip
        finally:
            await db.close()
        stack = profiled(Stack.build(box, ("ingest",), log_dir / name.replace(" ", "-")))
        stack.log_dir.mkdir(parents=True, exist_ok=True)
        if checkout is not None:
            s = stack.services["ingest"]
            stack.services["ingest"] = BaselineService(s.name, s.port, s.env, s.log_path, checkout=checkout)
        await stack.start()
        try:
            yield Side(name, box, stack["ingest"], key)
        finally:
            stack.stop()


async def _count_runs(box: Sandbox) -> tuple[int, int]:
    """Placeholder rows written, and rate-limit upserts made (rows inserted or updated in the sandbox's table, from
    PostgreSQL's statistics, which ingest's connections flush when idle)."""
    db = await connect(box.infra.database_url, box.schema)
    try:
        runs = int(await db.fetchval("SELECT count(*) FROM runs WHERE flow_id = $1", FLOW))
        await asyncio.sleep(1.5)  # backends flush their table statistics at most once a second
        upserts = await db.fetchval(
            "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE schemaname = $1 "
            "AND relname = 'rate_limit_windows'", box.schema,
        )  # fmt: skip
        return runs, int(upserts or 0)
    finally:
        await db.close()


async def _raw_produce(bootstrap: str, topic: str, n: int, k: int) -> float:
    """Records per second through a producer built as ingest's appender builds it (acks=all, idempotent, its
    linger), each send awaited on its own with `k` in flight, as the trigger route awaits its append: to the
    sandbox's triggers topic, which nothing reads here (no executor runs), deleted with the sandbox."""
    value = orjson.dumps({"type": "TriggerReceived", "tenant_id": TENANT, "flow_id": FLOW, "pad": "x" * 400})
    producer = kafka.producer(bootstrap, linger_ms=IngestSettings().producer_linger_ms, max_batch_size=512 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"warm")
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                await producer.send_and_wait(topic, value, key=f"run_{i:028x}".encode())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(k)))
        return n / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def _raw_round_trips(box: Sandbox, n: int, k: int) -> float:
    """`SELECT 1` round trips per second over a pool of ingest's size, `k` in flight."""
    pool = await create_pool(box.infra.database_url, box.schema, min_size=10, max_size=10)
    try:
        counter = iter(range(n))

        async def worker() -> None:
            for _ in counter:
                await pool.fetchval("SELECT 1")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(k)))
        return n / (time.perf_counter() - started)
    finally:
        await pool.close()
