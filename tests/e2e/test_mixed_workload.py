"""A mixed workload of every run shape on the real stack, then `flowtrail projector verify`: it must be equal
(invariant 1, issue 12: verify differed after ~110,000 runs of retries, cancels, timeouts, pauses, subflows...).

Mostly cheap 1-3 step runs fired in batch triggers, around them: step retries with backoff (an upstream that
fails the first attempts), FROM_FAILED_STEP chains (fail, retry that fails again, retry that succeeds; single
and bulk retries), cancels of running, paused and retrying runs (one at a time and in bulk), flow and step
timeouts (also while a step waits to retry), human_input pauses resumed and expired, subflows (a child that
succeeds, one that fails), partial syncs against a loopback destination that refuses a record and their
retries, concurrency-limited flows, scheduled runs, invalid inputs, a tenant over its quota, bulk archives.

The size is FLOWTRAIL_WORKLOAD_RUNS (default 10,000 runs); `make soak` runs it at a larger size. Time runs 100
times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01): a 100 s backoff takes one real second.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import cycle
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from schemas.topics import Topics
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import create_pool
from services.common.kafka import publish_flow_events, topic_partitions
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, make_sandbox
from tests.e2e.stack import Stack, free_port

RUNS = int(os.environ.get("FLOWTRAIL_WORKLOAD_RUNS", "10000"))
SCALE = max(1.0, RUNS / 10_000)  # the special shapes grow with the workload, the cheap runs fill the rest
TERMINAL = ("SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR")
TENANT, METERED = "acme", "metered"


def n(base: int) -> int:
    return max(2, round(base * SCALE))


def special_runs() -> int:
    """Runs of the shapes below, retries and children included; cheap runs make up the rest of RUNS."""
    chains, syncs, parents = 3 * n(40), 2 * n(10), 2 * n(50) + 2 * n(10)
    return chains + 3 * n(30) + 5 * n(20) + 2 * n(10) + syncs + n(150) + parents + 3


# ---------------------------------------------------------------- the loopback upstream


@dataclass
class Upstream:
    url: str = ""
    calls: Counter[str] = field(default_factory=Counter)  # by path key: how often it was called
    destination_accepts_all: bool = False  # the sync destination refuses `bad` records until this flips

    async def flaky(self, request: web.Request) -> web.Response:
        """Fails (503, retried with backoff) the first `fails` calls for a key, then answers."""
        key = request.match_info["key"]
        self.calls[key] += 1
        if self.calls[key] <= int(request.query.get("fails", "2")):
            return web.json_response({"error": "warehouse busy"}, status=503)
        return web.json_response({"ok": True, "calls": self.calls[key]})

    async def gate(self, request: web.Request) -> web.Response:
        """Refuses (422, not retried) the first two calls for a key: a FROM_FAILED_STEP chain of three runs."""
        key = "gate:" + request.match_info["key"]
        self.calls[key] += 1
        if self.calls[key] <= 2:
            return web.json_response({"error": "order locked"}, status=422)
        return web.json_response({"reserved": True})

    async def down(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "unavailable"}, status=503)

    async def reject(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=422)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response({"late": True})

    async def source(self, request: web.Request) -> web.Response:
        items = [{"id": i, "name": f"item {i}", "bad": i == 3, "updated_at": "2026-11-20T09:00:00Z"} for i in range(5)]
        return web.json_response({"items": items})

    async def destination(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("bad") and not self.destination_accepts_all:
            return web.json_response({"title": "Bad Request", "detail": "item 3 is discontinued"}, status=400)
        return web.json_response({"id": f"dst-{body['id']}"}, status=201)


async def _serve(up: Upstream) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/flaky/{key}", up.flaky)
    app.router.add_post("/gate/{key}", up.gate)
    app.router.add_get("/down", up.down)
    app.router.add_get("/reject", up.reject)
    app.router.add_get("/slow", up.slow)
    app.router.add_get("/src", up.source)
    app.router.add_post("/dst", up.destination)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    up.url = f"http://127.0.0.1:{port}"
    return runner


# ---------------------------------------------------------------- the flows


def _flows(up: str) -> list[FlowDefinition]:
    def flow(id: str, steps: list[dict[str, Any]], tenant: str = TENANT, **extra: Any) -> FlowDefinition:
        return FlowDefinition.model_validate({"tenant_id": tenant, "id": id, "name": id.title(), "version": 1,
                                              "steps": steps, **extra})  # fmt: skip

    def shape(i: int) -> dict[str, Any]:
        return {"name": f"shape{i}", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}", "i": i}}}

    def call(url: str, **extra: Any) -> dict[str, Any]:
        return {"name": "call", "action": "http_request", "input": {"method": "GET", "url": up + url}, **extra}

    def delay(seconds: int) -> dict[str, Any]:
        return {"name": "wait", "action": "delay", "input": {"seconds": seconds}}

    never: dict[str, Any] = {"delays_s": []}
    return [
        flow("one", [shape(0)]),
        flow("two", [shape(0), shape(1)]),
        flow("three", [shape(0), shape(1), shape(2)]),
        # 503 twice, retried after 1 s and 2 s (10 and 20 ms here), then it answers.
        flow("backoff", [shape(0), call("/flaky/{{ trigger.key }}?fails=2", retry={"delays_s": [1, 2, 3]})]),
        flow("reserve", [
            {"name": "price", "action": "transform", "input": {"output": {"total": 42}}},
            {"name": "reserve", "action": "http_request", "retry": never,
             "input": {"method": "POST", "url": up + "/gate/{{ trigger.key }}", "body": {"n": "{{ trigger.n }}"}}},
            {"name": "confirm", "action": "transform", "input": {"output": {"ok": "{{ steps.reserve.output.body }}"}}},
        ]),
        # Waits 30,000 s (5 min) to retry: canceled, or past the flow deadline, while it waits. Long enough that
        # under a soak's backlog none retries before the last has failed once.
        flow("stuck", [shape(0), call("/down", retry={"delays_s": [30_000]})]),
        flow("deadline_retrying", [shape(0), call("/down", retry={"delays_s": [3000]})], timeout_s=300),
        flow("deadline", [shape(0), delay(1000)], timeout_s=50),
        flow("slowstep", [call("/slow", timeout_s=0.3, retry={"delays_s": [1]})]),
        flow("long", [shape(0), delay(60_000)]),
        flow("approval", [
            shape(0),
            {"name": "approve", "action": "human_input", "input": {"question": "Ship {{ trigger.n }}?"}},
            {"name": "ship", "action": "transform", "input": {"output": {"by": "{{ steps.approve.output.by }}"}}},
        ]),
        flow("expiring", [{"name": "approve", "action": "human_input", "input": {"question": "?"}, "timeout_s": 100}]),
        flow("child", [shape(0)]),
        flow("failing_child", [call("/reject", retry=never)]),
        flow("parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "child", "input": {"n": "{{ trigger.n }}"}}},
            {"name": "use", "action": "transform", "input": {"output": {"got": "{{ steps.spawn.output.status }}"}}},
        ]),
        flow("strict_parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "failing_child", "input": {}}}, shape(1),
        ]),
        flow("limited", [delay(10)], concurrency_limit=2),
        flow("sync", [{
            "name": "sync_items", "action": "sync_records", "retry": never,
            "input": {
                "source": {"kind": "http", "url": up + "/src", "records_path": "items",
                           "updated_since_param": None, "updated_until_param": None},
                "destination": {"kind": "http", "url": up + "/dst"},
                "key": "id", "updated_at": "updated_at",
                "mapping": {"id": "id", "name": "name", "bad": "bad"},
            },
        }]),
        flow("guarded", [shape(0)], input_schema={
            "type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}},
        }),
        flow("metered", [delay(200)], tenant=METERED),
    ]  # fmt: skip


# ---------------------------------------------------------------- the stack


@dataclass
class Env:
    stack: Stack
    upstream: Upstream
    db: asyncpg.Pool  # the shapes poll it at the same time
    client: httpx.AsyncClient
    key: str
    key_metered: str
    settings: ProjectorSettings
    fired: int = 0  # runs the workload created (triggers, retries, children)

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def trigger(self, flow_id: str, inputs: list[Any], key: str | None = None, **body: Any) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(inputs), 100_000):
            chunk = inputs[start : start + 100_000]
            r = await self.client.post(f"{self.stack['ingest'].url}/v1/flows/{flow_id}/trigger",
                                       json={"inputs": chunk, **body}, headers=self.auth(key))  # fmt: skip
            assert r.status_code == 202, r.text
            accepted = r.json()["run_ids"]
            # Visible from the 202 on (invariant 9): every accepted run is in the read model at once, whatever the
            # backlog of the executor and the projector.
            visible = await self.db.fetchval("SELECT count(*) FROM runs WHERE id = ANY($1::text[])", accepted)
            assert visible == len(accepted), f"{len(accepted) - visible} of {len(accepted)} accepted runs not visible"
            ids += accepted
        self.fired += len(ids)
        return ids

    async def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = await self.client.request(method, self.stack["api"].url + path, headers=self.auth(), **kwargs)
        assert r.status_code in (200, 202), f"{method} {path}: {r.status_code} {r.text}"
        return r

    async def retry(self, run_ids: list[str], bulk: bool) -> list[str]:
        body = {"strategy": "FROM_FAILED_STEP"}
        if bulk:
            new = (await self.api("POST", "/v1/runs/bulk/retry", json={"ids": run_ids, **body})).json()["new_run_ids"]
        else:
            new = [(await self.api("POST", f"/v1/runs/{i}/retry", json=body)).json()["run_id"] for i in run_ids]
        assert len(new) == len(run_ids)
        visible = await self.db.fetchval("SELECT count(*) FROM runs WHERE id = ANY($1::text[])", list(new))
        assert visible == len(new), f"{len(new) - visible} of {len(new)} accepted retries not visible"
        self.fired += len(new)
        return list(new)

    async def until(self, what: str, query: str, *args: Any, within: float = 120) -> Any:
        """Polls `query` until its first value is truthy; returns it."""
        deadline = time.monotonic() + within * SCALE
        while not (value := await self.db.fetchval(query, *args)):
            assert time.monotonic() < deadline, (
                f"{what}: not after {within * SCALE:.0f}s\n" + self.stack["executor"].log_tail()
            )
            await asyncio.sleep(0.2)
        return value

    async def all_in(self, ids: list[str], statuses: tuple[str, ...], what: str) -> None:
        await self.until(
            what, "SELECT count(*) = $2 FROM runs WHERE id = ANY($1::text[]) AND status = ANY($3::text[])",
            ids, len(ids), list(statuses),
        )  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        upstream = Upstream()
        runner = await _serve(upstream)
        db = await create_pool(infra.database_url, sandbox.schema, max_size=8)
        async with db.acquire() as conn:
            for tenant in (TENANT, METERED):
                await ensure_tenant(conn, tenant, tenant.upper())
            key, key_metered = (await create_api_key(conn, TENANT))[1], (await create_api_key(conn, METERED))[1]
        flows = _flows(upstream.url)
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [
            FlowVersionPublished(tenant_id=f.tenant_id, flow_id=f.id, flow_version=1, flow=f) for f in flows
        ])  # fmt: skip
        stack = Stack.build(
            sandbox,
            ("ingest", "executor", "projector", "api"),
            tmp_path_factory.mktemp("logs"),
            FLOWTRAIL_EXECUTOR_TIME_SCALE="0.01",
            FLOWTRAIL_EXECUTOR_TENANT_QUOTAS=f'{{"{METERED}": 1}}',
            # Small live batches: the replay (5,000 a batch) cuts the log elsewhere.
            FLOWTRAIL_PROJECTOR_BATCH_MAX_RECORDS="700",
            FLOWTRAIL_PROJECTOR_RETENTION_INTERVAL_S="0",
        )
        settings = ProjectorSettings(
            kafka_bootstrap=infra.kafka_bootstrap, database_url=infra.database_url, database_schema=sandbox.schema,
            topic_prefix=sandbox.topics.prefix,
        )  # fmt: skip
        await stack.start()
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
                e = Env(stack, upstream, db, client, key, key_metered, settings)
                await e.until("flows projected", "SELECT count(*) = $1 FROM flows", len(flows), within=30)
                yield e
        finally:
            stack.stop()
            await db.close()
            await runner.cleanup()


# ---------------------------------------------------------------- the shapes


async def _chains(env: Env) -> None:
    """reserve: FAILED, its FROM_FAILED_STEP retry FAILED again, the retry of that SUCCEEDED."""
    ids = await env.trigger("reserve", [{"n": i, "key": f"k{i}"} for i in range(n(40))])
    for _ in range(2):
        await env.all_in(ids, ("FAILED",), "reserve runs failed")
        half = len(ids) // 2
        ids = await env.retry(ids[:half], bulk=False) + await env.retry(ids[half:], bulk=True)
    await env.all_in(ids, ("SUCCEEDED",), "third runs of the reserve chains succeeded")


async def _cancel_retrying(env: Env) -> None:
    """Canceled while the step waits to retry: one at a time, then the rest in bulk."""
    ids = await env.trigger("stuck", [{"n": i} for i in range(n(30))])
    waiting = (
        "SELECT count(*) = $2 FROM run_steps WHERE run_id = ANY($1::text[]) AND step = 'call' AND status = 'RETRYING'"
    )
    await env.until("stuck steps waiting to retry", waiting, ids, len(ids))
    for run_id in ids[: len(ids) // 2]:
        await env.api("POST", f"/v1/runs/{run_id}/cancel", json={"reason": "upstream is down"})
    await env.api("POST", "/v1/runs/bulk/cancel", json={"flow_id": "stuck", "statuses": ["RUNNING"]})
    await env.all_in(ids, ("CANCELED",), "stuck runs canceled")


async def _cancel_running(env: Env) -> None:
    ids = await env.trigger("long", [{"n": i} for i in range(n(30))])
    await env.all_in(ids, ("RUNNING",), "long runs running")
    for run_id in ids[: len(ids) // 3]:
        await env.api("POST", f"/v1/runs/{run_id}/cancel", json={})
    await env.api("POST", "/v1/runs/bulk/cancel", json={"flow_id": "long", "statuses": ["RUNNING"],
                                                       "exclude_ids": ids[-2:]})  # fmt: skip
    await env.api("POST", "/v1/runs/bulk/cancel", json={"ids": ids[-2:]})
    await env.all_in(ids, ("CANCELED",), "long runs canceled")


async def _pauses(env: Env) -> None:
    """Resumed with the request id, canceled in bulk while paused, or left to expire."""
    ids = await env.trigger("approval", [{"n": i} for i in range(n(30))])
    await env.trigger("expiring", [{"n": i} for i in range(n(20))])
    await env.all_in(ids, ("PAUSED",), "approvals paused")
    paused = (
        "SELECT run_id, payload->>'request_id' AS request_id FROM run_events WHERE run_id = ANY($1::text[]) "
        "AND type = 'RunPaused'"
    )
    requests = await env.db.fetch(paused, ids[: len(ids) // 2])
    for r in requests:
        await env.api("POST", f"/v1/runs/{r['run_id']}/resume/{r['request_id']}", json={"by": "ops"})
    await env.all_in(ids[: len(ids) // 2], ("SUCCEEDED",), "resumed approvals succeeded")
    await env.api("POST", "/v1/runs/bulk/cancel", json={"flow_id": "approval", "statuses": ["PAUSED"]})
    await env.all_in(ids[len(ids) // 2 :], ("CANCELED",), "paused approvals canceled")


async def _partial_syncs(env: Env) -> None:
    ids = await env.trigger("sync", [{"n": i} for i in range(n(10))])
    await env.all_in(ids, ("PARTIAL",), "syncs partial")
    again = await env.retry(ids[:2], bulk=False)  # the refused record only, refused again
    await env.all_in(again, ("PARTIAL",), "retried syncs partial again")
    env.upstream.destination_accepts_all = True
    r = await env.api("POST", "/v1/runs/bulk/retry", json={"ids": ids[2:], "strategy": "FROM_FAILED_STEP"})
    env.fired += len(r.json()["new_run_ids"])
    await env.all_in(r.json()["new_run_ids"], ("SUCCEEDED",), "retried syncs succeeded")


async def _the_rest(env: Env) -> None:
    """Fire and forget: they end by themselves."""
    await env.trigger("backoff", [{"n": i, "key": f"b{i}"} for i in range(n(150))])
    await env.trigger("deadline_retrying", [{"n": i} for i in range(n(20))])
    await env.trigger("deadline", [{"n": i} for i in range(n(20))])
    await env.trigger("slowstep", [{"n": i} for i in range(n(10))])
    await env.trigger("parent", [{"n": i} for i in range(n(50))])
    await env.trigger("strict_parent", [{"n": i} for i in range(n(10))])
    env.fired += n(50) + n(10)  # their children
    await env.trigger("limited", [{"n": i} for i in range(n(20))])
    await env.trigger("guarded", [{"n": i} if i % 2 else {"n": -i} for i in range(n(20))])
    await env.trigger(
        "one", [{"n": i} for i in range(n(10))], run_at=(datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    )
    await env.trigger("metered", [{"n": i} for i in range(3)], key=env.key_metered)


async def _cheap(env: Env, count: int) -> None:
    """The bulk of the runs: one large batch trigger and batches of 1,000, 1-3 steps each."""
    big = int(count * 0.8)
    await env.trigger("one", [{"n": i} for i in range(big)])
    rest, flows = count - big, cycle(("two", "three"))
    while rest > 0:
        size = min(1000, rest)
        await env.trigger(next(flows), [{"n": j} for j in range(size)])
        rest -= size


# ---------------------------------------------------------------- the test


async def _caught_up(env: Env) -> None:
    """Every run final, and the projector's stored offsets at the end of the ledger and flows topics, twice in a row
    a second apart (archives and children's ends follow a run's final status)."""
    topics = Topics(env.settings.topic_prefix)
    known = await topic_partitions(env.settings.kafka_bootstrap, [topics.ledger, topics.flows])
    parts = [TopicPartition(t, p) for t, ps in known.items() for p in ps]
    consumer = AIOKafkaConsumer(bootstrap_servers=env.settings.kafka_bootstrap)
    await consumer.start()
    try:
        stable = 0
        deadline = time.monotonic() + 120 * SCALE
        while stable < 2:
            ends = await consumer.end_offsets(parts)
            rows = await env.db.fetch("SELECT topic, partition, next_offset FROM projector_offsets")
            stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
            open_runs = await env.db.fetchval("SELECT count(*) FROM runs WHERE status <> ALL($1::text[])", TERMINAL)
            done = not open_runs and all(stored.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items())
            stable = stable + 1 if done else 0
            assert time.monotonic() < deadline, f"{open_runs} runs not final, offsets {stored} of {ends}"
            await asyncio.sleep(1)
    finally:
        await consumer.stop()


async def _timed(what: str, timings: dict[str, float], work: Callable[[], Awaitable[None]]) -> None:
    started = time.monotonic()
    await work()
    timings[what] = time.monotonic() - started


async def test_verify_equals_live_after_a_mixed_workload_of_every_run_shape(env: Env, tmp_path: Path) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}
    special = [_chains, _cancel_retrying, _cancel_running, _pauses, _partial_syncs, _the_rest]
    shapes = asyncio.gather(*(_timed(f.__name__, timings, partial(f, env)) for f in special))
    await asyncio.sleep(0.5)
    await _timed("cheap", timings, partial(_cheap, env, max(0, RUNS - special_runs())))
    await shapes
    # Archive what the chains left failed, in bulk, and a few finished runs one at a time.
    await env.api("POST", "/v1/runs/bulk/archive", json={"flow_id": "reserve", "statuses": ["FAILED"]})
    for run_id in await env.db.fetch("SELECT id FROM runs WHERE flow_id = 'two' AND status = 'SUCCEEDED' LIMIT 5"):
        await env.api("POST", f"/v1/runs/{run_id['id']}/archive")
    await env.until("archives projected", "SELECT count(*) >= $1 FROM runs WHERE archived", 2 * n(40) + 5)
    await _timed("caught up", timings, partial(_caught_up, env))
    workload_s = time.monotonic() - started

    total = await env.db.fetchval("SELECT count(*) FROM runs")
    assert total == env.fired >= RUNS, (total, env.fired)
    statuses = dict(await env.db.fetch("SELECT status, count(*) FROM runs GROUP BY status"))
    assert set(statuses) >= {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED"}
    assert "INTERNAL_ERROR" not in statuses, statuses
    # The shapes that matter for the comparison did happen.
    canceled_waiting = await env.db.fetchval(
        "SELECT count(*) FROM step_attempts WHERE status = 'CANCELED' AND retry_at IS NOT NULL"
    )
    assert canceled_waiting >= n(30), canceled_waiting  # stuck runs, canceled while a step waited to retry
    # deadline_retrying runs: the flow timeout passed while a step waited to retry; that step fails, named by it.
    failed_waiting = await env.db.fetchval(
        "SELECT count(*) FROM runs r JOIN run_steps s ON s.run_id = r.id WHERE r.flow_id = 'deadline_retrying' "
        "AND r.status = 'TIMED_OUT' AND s.status = 'FAILED' AND r.failed_step = s.step"
    )
    assert failed_waiting >= n(20), failed_waiting
    assert await env.db.fetchval("SELECT count(*) FROM step_attempts WHERE attempt = 3 AND status = 'SUCCEEDED'")
    assert await env.db.fetchval("SELECT count(*) FROM run_events WHERE type = 'RunBlocked'")
    assert await env.db.fetchval("SELECT count(*) FROM record_errors") >= n(10) + 2

    lines: list[str] = []
    verify_started = time.monotonic()
    outcome = await rebuild.run(env.settings, swap=False, progress=lines.append)
    verify_s = time.monotonic() - verify_started
    print(f"\nmixed workload: {total:,} runs {statuses} in {workload_s:.0f}s ({timings}); "
          f"verify replayed {outcome.events:,} events in {verify_s:.0f}s")  # fmt: skip
    assert outcome.comparison.equal, rebuild.describe(outcome.comparison)
