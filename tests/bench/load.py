"""Load for end-to-end benchmarks: a running Flowtrail, a trigger client, and watchers of what became visible."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from schemas.status import TERMINAL_RUN_STATUSES
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.common.settings import REPO_ROOT
from tests.bench.loaders import bench_sandbox
from tests.bench.measure import wait_until
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import Service, Stack

PROFILE_ENV = "FLOWTRAIL_BENCH_PROFILE"
TERMINAL = sorted(s.value for s in TERMINAL_RUN_STATUSES)
TENANT = "bench"


def noop_flow(flow_id: str, steps: int) -> FlowDefinition:
    """`steps` transform steps that each output a constant: the executor's own cost, no outside calls."""
    return FlowDefinition.model_validate({
        "id": flow_id, "tenant_id": TENANT, "name": flow_id, "version": 1, "trigger": {"type": "api"},
        "steps": [{"name": f"s{i}", "action": "transform", "input": {"output": {"i": i}}} for i in range(steps)],
    })  # fmt: skip


@dataclass
class Flowtrail:
    """All four services running against one sandbox, with a key of the benchmark tenant."""

    sandbox: Sandbox
    stack: Stack
    key: str
    db: asyncpg.Connection

    @property
    def ingest(self) -> str:
        return self.stack["ingest"].url

    @property
    def api(self) -> str:
        return self.stack["api"].url

    def pids(self) -> dict[str, int]:
        return {n: s.process.pid for n, s in self.stack.services.items() if s.process is not None}

    async def terminal_count(self, flow_id: str) -> int:
        sql = "SELECT count(*) FROM runs WHERE tenant_id = $1 AND flow_id = $2 AND status = ANY($3::text[])"
        return int(await self.db.fetchval(sql, TENANT, flow_id, TERMINAL))

    def log_tails(self) -> str:
        return "\n".join(f"--- {n}\n{s.log_tail(15)}" for n, s in self.stack.services.items())


@asynccontextmanager
async def running_flowtrail(infra: Infra, partitions: int, log_dir: Path,
                            flows: Sequence[FlowDefinition]) -> AsyncIterator[Flowtrail]:  # fmt: skip
    async with bench_sandbox(infra, partitions) as box:
        db = await connect(infra.database_url, box.schema)
        try:
            await ensure_tenant(db, TENANT, "Benchmarks")
            _, key = await create_api_key(db, TENANT)
            await publish_flow_events(infra.kafka_bootstrap, box.topics, [
                FlowVersionPublished(tenant_id=TENANT, flow_id=f.id, flow_version=f.version, flow=f) for f in flows
            ])  # fmt: skip
            stack = profiled(Stack.build(box, ("ingest", "executor", "projector", "api"), log_dir))
            await stack.start()
            try:
                ft = Flowtrail(box, stack, key, db)

                async def flows_projected() -> bool:
                    return int(await db.fetchval("SELECT count(*) FROM flows")) >= len(flows)

                async def executor_owns_all() -> bool:
                    async with aiohttp.ClientSession() as s, s.get(stack["executor"].url + "/healthz") as r:
                        return len((await r.json())["partitions"]) == partitions

                await wait_until(flows_projected, within=60, interval=0.05, what="flows projected",
                                 on_timeout=ft.log_tails)  # fmt: skip
                await wait_until(executor_owns_all, within=90, interval=0.1, what="executor partition assignment",
                                 on_timeout=ft.log_tails)  # fmt: skip
                yield ft
            finally:
                stack.stop()
        finally:
            await db.close()


@dataclass
class ProfiledService(Service):
    """A service run under cProfile; the stats are written to `<log>.prof` when it stops."""

    def start(self) -> None:
        log = self.log_path.open("ab")
        profile = self.log_path.with_suffix(".prof")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.profile_service", str(profile), f"services.{self.name}"],
            cwd=REPO_ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def profiled(stack: Stack) -> Stack:
    """Runs the services named in FLOWTRAIL_BENCH_PROFILE (e.g. `executor,projector`) under cProfile."""
    wanted = {n.strip() for n in os.environ.get(PROFILE_ENV, "").split(",") if n.strip()}
    for name in wanted & set(stack.services):
        s = stack.services[name]
        stack.services[name] = ProfiledService(s.name, s.port, s.env, s.log_path)
    return stack


class TriggerClient:
    """aiohttp rather than httpx: the load generator shares two cores with everything it measures."""

    def __init__(self, ft: Flowtrail, concurrency: int) -> None:
        self.ft = ft
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            headers={"Authorization": f"Bearer {ft.key}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=600),
        )

    async def close(self) -> None:
        await self.session.close()

    async def _post(self, flow_id: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.ft.ingest}/v1/flows/{flow_id}/trigger"
        async with self.session.post(url, data=orjson.dumps(body)) as r:
            raw = await r.read()
            assert r.status == 202, f"benchmark harness: trigger answered {r.status}: {raw[:500]!r}"
            return dict(orjson.loads(raw))

    async def one(self, flow_id: str, payload: Any) -> str:
        return str((await self._post(flow_id, {"input": payload}))["run_id"])

    async def batch(self, flow_id: str, inputs: list[Any]) -> list[str]:
        return list((await self._post(flow_id, {"inputs": inputs}))["run_ids"])

    async def many(self, flow_id: str, n: int, concurrency: int) -> list[str]:
        """n single-input triggers, `concurrency` in flight at all times (closed loop)."""
        ids: list[str] = []
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                ids.append(await self.one(flow_id, {"n": i}))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ids


@dataclass
class Visibility:
    """Reads the read model the API serves from whenever the projector says it committed (the notice the API's live
    streams wake on), and at least every `interval`; records when each awaited run is first seen final. Reading on
    the notice rather than on a timer alone keeps the wait for the next poll out of the figures."""

    db: asyncpg.Connection
    interval: float = 0.005
    pending: dict[str, float] = field(default_factory=dict)  # run id → monotonic time its trigger was sent
    latency_ms: dict[str, float] = field(default_factory=dict)
    sent_wall: dict[str, float] = field(default_factory=dict)  # wall clock, to line up with event timestamps
    seen_wall: dict[str, float] = field(default_factory=dict)

    def expect(self, run_id: str, sent_at: float) -> None:
        self.pending[run_id] = sent_at
        self.sent_wall[run_id] = time.time() - (time.monotonic() - sent_at)

    async def run(self) -> None:
        sql = "SELECT id FROM runs WHERE id = ANY($1::text[]) AND status = ANY($2::text[])"
        schema = await self.db.fetchval("SELECT current_schema()")
        committed = asyncio.Event()

        def notice(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if payload == schema:
                committed.set()

        await self.db.add_listener(PROJECTED_CHANNEL, notice)
        try:
            while True:
                committed.clear()  # a commit during the read below wakes the next one at once
                if self.pending:
                    polled, wall = time.monotonic(), time.time()
                    for row in await self.db.fetch(sql, list(self.pending), TERMINAL):
                        sent = self.pending.pop(row["id"])
                        self.latency_ms[row["id"]] = (polled - sent) * 1000
                        self.seen_wall[row["id"]] = wall
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(committed.wait(), self.interval)
        finally:
            await self.db.remove_listener(PROJECTED_CHANNEL, notice)

    async def breakdown(self) -> dict[str, list[float]]:
        """Where each run's latency went (ms), from the timestamps the services recorded on the way."""
        rows = await self.db.fetch(
            "SELECT r.id, e.occurred_at AS requested_at, r.finished_at, e.payload->>'received_at' AS received_at "
            "FROM runs r "
            "JOIN run_events e ON e.run_id = r.id AND e.seq = 0 WHERE r.id = ANY($1::text[])",
            list(self.seen_wall),
        )
        out: dict[str, list[float]] = {k: [] for k in STAGES}
        for r in rows:
            received = datetime.fromisoformat(r["received_at"]).timestamp()
            # seq 0 is RunRequested, stamped by the executor (runs.created_at is ingest's received_at).
            requested, finished = r["requested_at"].timestamp(), r["finished_at"].timestamp()
            sent, seen = self.sent_wall[r["id"]], self.seen_wall[r["id"]]
            spans = ((sent, received), (received, requested), (requested, finished), (finished, seen))
            for key, (a, b) in zip(STAGES, spans, strict=True):
                out[key].append((b - a) * 1000)
        return out


PROJECTED_CHANNEL = "flowtrail_projected"  # services/api/adapters/notify.py
STAGES = {
    "http_to_ingest": "trigger sent → ingest received",
    "ingest_to_executor": "ingest received → executor RunRequested",
    "executor_run": "RunRequested → terminal event (executor)",
    "ledger_to_visible": "terminal event → visible in read model",
}


@dataclass
class Timeline:
    """Every `interval`: end offsets of triggers and ledger, the projector's stored ledger offsets, final runs."""

    ft: Flowtrail
    db: asyncpg.Connection
    flow_id: str
    interval: float = 0.1
    samples: list[dict[str, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.ft.sandbox.infra.kafka_bootstrap, group_id=None)
        await self.consumer.start()
        await self.sample()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.sample()
        await self.consumer.stop()

    async def _end(self, topic: str) -> int:
        tps = [TopicPartition(topic, p) for p in range(self.ft.sandbox.partitions)]
        return sum((await self.consumer.end_offsets(tps)).values())

    async def sample(self) -> None:
        topics = self.ft.sandbox.topics
        projected = await self.db.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM projector_offsets WHERE topic = $1", topics.ledger
        )
        final = await self.db.fetchval(
            "SELECT count(*) FROM runs WHERE flow_id = $1 AND status = ANY($2::text[])", self.flow_id, TERMINAL
        )
        self.samples.append({
            "t": time.monotonic(), "triggers": await self._end(topics.triggers),
            "ledger": await self._end(topics.ledger), "projected": int(projected), "final_runs": int(final),
        })  # fmt: skip

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sample()

    def stages(self, t0: float) -> dict[str, dict[str, float]]:
        """Per counter: seconds from t0 to its first move and to reaching its final value, and its rate between."""
        first, last = self.samples[0], self.samples[-1]
        out = {}
        for key in ("triggers", "ledger", "projected", "final_runs"):
            delta = last[key] - first[key]
            moved = next((s["t"] for s in self.samples if s[key] > first[key]), last["t"])
            done = next((s["t"] for s in self.samples if s[key] >= last[key]), last["t"])
            out[key] = {
                "count": delta, "first_move_s": moved - t0, "done_s": done - t0,
                "rate_per_s": delta / (done - moved) if done > moved else float("nan"),
            }  # fmt: skip
        return out
