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

from schemas.flows import FlowDefinition
from services.common.db import create_pool
from services.projector import rebuild
from tests.conftest import Infra
from tests.harness import (
    TERMINAL,
    Env,
    answer,
    delayed,
    end_offsets,
    flow,
    projector_settings,
    running,
    stub_upstream,
    wait_sql,
    whole_sync,
)

RUNS = int(os.environ.get("FLOWTRAIL_WORKLOAD_RUNS", "10000"))
SCALE = max(1.0, RUNS / 10_000)  # the special shapes grow with the workload, the cheap runs fill the rest
TENANT, METERED = "acme", "metered"


def n(base: int) -> int:
    return max(2, round(base * SCALE))


def special_runs() -> int:
    """Runs of the shapes below, retries and children included; cheap runs make up the rest of RUNS."""
    chains, syncs, parents = 3 * n(40), 2 * n(10), 2 * n(50) + 2 * n(10)
    return chains + 3 * n(30) + 5 * n(20) + 2 * n(10) + syncs + n(150) + parents + 3


# ---------------------------------------------------------------- the loopback upstream


@dataclass
class Loopback:
    """What the loopback upstream remembers: calls by key, and whether the sync destination takes every record."""

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

    async def source(self, request: web.Request) -> web.Response:
        items = [{"id": i, "name": f"item {i}", "bad": i == 3, "updated_at": "2026-11-20T09:00:00Z"} for i in range(5)]
        return web.json_response({"items": items})

    async def destination(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("bad") and not self.destination_accepts_all:
            return web.json_response({"title": "Bad Request", "detail": "item 3 is discontinued"}, status=400)
        return web.json_response({"id": f"dst-{body['id']}"}, status=201)


UPSTREAM = Loopback()
ROUTES = {
    ("GET", "/flaky/{key}"): UPSTREAM.flaky,
    ("POST", "/gate/{key}"): UPSTREAM.gate,
    ("GET", "/down"): answer({"error": "unavailable"}, 503),
    ("GET", "/reject"): answer({"error": "no"}, 422),
    ("GET", "/slow"): delayed(3, answer({"late": True})),
    ("GET", "/src"): UPSTREAM.source,
    ("POST", "/dst"): UPSTREAM.destination,
}


# ---------------------------------------------------------------- the flows


def _flows(up: str) -> list[FlowDefinition]:
    def a(id: str, steps: list[dict[str, Any]], tenant: str = TENANT, **extra: Any) -> FlowDefinition:
        return flow(tenant, id, steps, **extra)

    def shape(i: int) -> dict[str, Any]:
        return {"name": f"shape{i}", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}", "i": i}}}

    def call(url: str, **extra: Any) -> dict[str, Any]:
        return {"name": "call", "action": "http_request", "input": {"method": "GET", "url": up + url}, **extra}

    def delay(seconds: int) -> dict[str, Any]:
        return {"name": "wait", "action": "delay", "input": {"seconds": seconds}}

    never: dict[str, Any] = {"delays_s": []}
    return [
        a("one", [shape(0)]),
        a("two", [shape(0), shape(1)]),
        a("three", [shape(0), shape(1), shape(2)]),
        # 503 twice, retried after 1 s and 2 s (10 and 20 ms here), then it answers.
        a("backoff", [shape(0), call("/flaky/{{ trigger.key }}?fails=2", retry={"delays_s": [1, 2, 3]})]),
        a("reserve", [
            {"name": "price", "action": "transform", "input": {"output": {"total": 42}}},
            {"name": "reserve", "action": "http_request", "retry": never,
             "input": {"method": "POST", "url": up + "/gate/{{ trigger.key }}", "body": {"n": "{{ trigger.n }}"}}},
            {"name": "confirm", "action": "transform", "input": {"output": {"ok": "{{ steps.reserve.output.body }}"}}},
        ]),
        # Waits 30,000 s (5 min) to retry: canceled, or past the flow deadline, while it waits. Long enough that
        # under a soak's backlog none retries before the last has failed once.
        a("stuck", [shape(0), call("/down", retry={"delays_s": [30_000]})]),
        a("deadline_retrying", [shape(0), call("/down", retry={"delays_s": [3000]})], timeout_s=300),
        a("deadline", [shape(0), delay(1000)], timeout_s=50),
        a("slowstep", [call("/slow", timeout_s=0.3, retry={"delays_s": [1]})]),
        a("long", [shape(0), delay(60_000)]),
        a("approval", [
            shape(0),
            {"name": "approve", "action": "human_input", "input": {"question": "Ship {{ trigger.n }}?"}},
            {"name": "ship", "action": "transform", "input": {"output": {"by": "{{ steps.approve.output.by }}"}}},
        ]),
        a("expiring", [{"name": "approve", "action": "human_input", "input": {"question": "?"}, "timeout_s": 100}]),
        a("child", [shape(0)]),
        a("failing_child", [call("/reject", retry=never)]),
        a("parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "child", "input": {"n": "{{ trigger.n }}"}}},
            {"name": "use", "action": "transform", "input": {"output": {"got": "{{ steps.spawn.output.status }}"}}},
        ]),
        a("strict_parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "failing_child", "input": {}}}, shape(1),
        ]),
        a("limited", [delay(10)], concurrency_limit=2),
        a("sync", [whole_sync("sync_items", up + "/src", "items", up + "/dst",
                              {"id": "id", "name": "name", "bad": "bad"}, updated_at="updated_at")]),
        a("guarded", [shape(0)], input_schema={
            "type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}},
        }),
        a("metered", [delay(200)], tenant=METERED),
    ]  # fmt: skip


# ---------------------------------------------------------------- the stack


@dataclass
class Workload:
    """The running stack, a pool the shapes poll at the same time, and how many runs the workload created
    (triggers, retries, children)."""

    env: Env
    db: asyncpg.Pool
    fired: int = 0

    async def trigger(self, flow_id: str, inputs: list[Any], key: str | None = None, **body: Any) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(inputs), 100_000):
            accepted = await self.env.trigger_many(flow_id, inputs[start : start + 100_000], key, **body)
            # Visible from the 202 on (invariant 9): every accepted run is in the read model at once, whatever the
            # backlog of the executor and the projector.
            visible = await self.db.fetchval("SELECT count(*) FROM runs WHERE id = ANY($1::text[])", accepted)
            assert visible == len(accepted), f"{len(accepted) - visible} of {len(accepted)} accepted runs not visible"
            ids += accepted
        self.fired += len(ids)
        return ids

    async def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        r = await self.env.api(method, path, **kwargs)
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
        logs = self.env.stack["executor"].log_tail
        return await wait_sql(self.db, query, *args, within=within * SCALE, what=what, logs=logs, every=0.2)

    async def all_in(self, ids: list[str], statuses: tuple[str, ...], what: str) -> None:
        await self.until(
            what, "SELECT count(*) = $2 FROM runs WHERE id = ANY($1::text[]) AND status = ANY($3::text[])",
            ids, len(ids), list(statuses),
        )  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Workload]:
    extra = {
        "FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01",
        "FLOWTRAIL_EXECUTOR_TENANT_QUOTAS": f'{{"{METERED}": 1}}',
        # Small live batches: the replay (5,000 a batch) cuts the log elsewhere.
        "FLOWTRAIL_PROJECTOR_BATCH_MAX_RECORDS": "700",
        "FLOWTRAIL_PROJECTOR_RETENTION_INTERVAL_S": "0",
    }
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, keys={TENANT: TENANT, METERED: METERED}, flows=_flows(up.url), env=extra, upstream=up
    ) as env:  # fmt: skip
        env.http.timeout = httpx.Timeout(120, connect=10)
        db = await create_pool(infra.database_url, env.sandbox.schema, max_size=8)
        try:
            yield Workload(env, db)
        finally:
            await db.close()


# ---------------------------------------------------------------- the shapes


async def _chains(env: Workload) -> None:
    """reserve: FAILED, its FROM_FAILED_STEP retry FAILED again, the retry of that SUCCEEDED."""
    ids = await env.trigger("reserve", [{"n": i, "key": f"k{i}"} for i in range(n(40))])
    for _ in range(2):
        await env.all_in(ids, ("FAILED",), "reserve runs failed")
        half = len(ids) // 2
        ids = await env.retry(ids[:half], bulk=False) + await env.retry(ids[half:], bulk=True)
    await env.all_in(ids, ("SUCCEEDED",), "third runs of the reserve chains succeeded")


async def _cancel_retrying(env: Workload) -> None:
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


async def _cancel_running(env: Workload) -> None:
    ids = await env.trigger("long", [{"n": i} for i in range(n(30))])
    await env.all_in(ids, ("RUNNING",), "long runs running")
    for run_id in ids[: len(ids) // 3]:
        await env.api("POST", f"/v1/runs/{run_id}/cancel", json={})
    await env.api("POST", "/v1/runs/bulk/cancel", json={"flow_id": "long", "statuses": ["RUNNING"],
                                                       "exclude_ids": ids[-2:]})  # fmt: skip
    await env.api("POST", "/v1/runs/bulk/cancel", json={"ids": ids[-2:]})
    await env.all_in(ids, ("CANCELED",), "long runs canceled")


async def _pauses(env: Workload) -> None:
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


async def _partial_syncs(env: Workload) -> None:
    ids = await env.trigger("sync", [{"n": i} for i in range(n(10))])
    await env.all_in(ids, ("PARTIAL",), "syncs partial")
    again = await env.retry(ids[:2], bulk=False)  # the refused record only, refused again
    await env.all_in(again, ("PARTIAL",), "retried syncs partial again")
    UPSTREAM.destination_accepts_all = True
    r = await env.api("POST", "/v1/runs/bulk/retry", json={"ids": ids[2:], "strategy": "FROM_FAILED_STEP"})
    env.fired += len(r.json()["new_run_ids"])
    await env.all_in(r.json()["new_run_ids"], ("SUCCEEDED",), "retried syncs succeeded")


async def _the_rest(env: Workload) -> None:
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
    await env.trigger("metered", [{"n": i} for i in range(3)], key=METERED)


async def _cheap(env: Workload, count: int) -> None:
    """The bulk of the runs: one large batch trigger and batches of 1,000, 1-3 steps each."""
    big = int(count * 0.8)
    await env.trigger("one", [{"n": i} for i in range(big)])
    rest, flows = count - big, cycle(("two", "three"))
    while rest > 0:
        size = min(1000, rest)
        await env.trigger(next(flows), [{"n": j} for j in range(size)])
        rest -= size


# ---------------------------------------------------------------- the test


async def _caught_up(env: Workload) -> None:
    """Every run final, and the projector's stored offsets at the end of the ledger and flows topics, twice in a row
    a second apart (archives and children's ends follow a run's final status)."""
    topics = env.env.sandbox.topics
    stable = 0
    deadline = time.monotonic() + 120 * SCALE
    while stable < 2:
        ends = await end_offsets(env.env.infra.kafka_bootstrap, [topics.ledger, topics.flows])
        rows = await env.db.fetch("SELECT topic, partition, next_offset FROM projector_offsets")
        stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        open_runs = await env.db.fetchval("SELECT count(*) FROM runs WHERE status <> ALL($1::text[])", list(TERMINAL))
        done = not open_runs and all(stored.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items())
        stable = stable + 1 if done else 0
        assert time.monotonic() < deadline, f"{open_runs} runs not final, offsets {stored} of {ends}"
        await asyncio.sleep(1)


async def _timed(what: str, timings: dict[str, float], work: Callable[[], Awaitable[None]]) -> None:
    started = time.monotonic()
    await work()
    timings[what] = time.monotonic() - started


async def test_verify_equals_live_after_a_mixed_workload_of_every_run_shape(env: Workload, tmp_path: Path) -> None:
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
    outcome = await rebuild.run(projector_settings(env.env.sandbox), swap=False, progress=lines.append)
    verify_s = time.monotonic() - verify_started
    print(f"\nmixed workload: {total:,} runs {statuses} in {workload_s:.0f}s ({timings}); "
          f"verify replayed {outcome.events:,} events in {verify_s:.0f}s")  # fmt: skip
    assert outcome.comparison.equal, rebuild.describe(outcome.comparison)
