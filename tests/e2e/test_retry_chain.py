"""Retries you can chain, on real processes and the real broker (issue 12): a run retried FROM_FAILED_STEP three
generations deep, each failing at a later step, runs every step that succeeded exactly once across the chain.

The flow calls a loopback upstream that counts calls per path: a login whose extracted `user_id` later steps use, a
profile read that answers 503 its first two times, a sync_records step whose destination refuses one record its
first two times (the run goes on, then ends FAILED or PARTIAL), and a notification refused the first time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port

TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}
RECORDS = [
    {"id": "r1", "name": "Ada", "updated_at": "2024-01-01T00:00:00+00:00"},
    {"id": "r2", "name": "Grace", "updated_at": "2024-01-01T00:00:01+00:00"},
]


@dataclass
class Upstream:
    url: str = ""
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # "METHOD /path" → statuses
    sink: list[tuple[str, int]] = field(default_factory=list)  # (record id, status) per write
    notified: list[Any] = field(default_factory=list)  # /notify bodies

    def answer(self, request: web.Request, status: int, body: Any) -> web.Response:
        self.calls[f"{request.method} {request.path}"].append(status)
        return web.json_response(body, status=status)


async def _upstream(up: Upstream) -> web.AppRunner:
    async def login(request: web.Request) -> web.Response:
        return up.answer(request, 200, {"id": 42, "token": "tok"})

    async def user(request: web.Request) -> web.Response:
        if len(up.calls[f"GET {request.path}"]) < 2:  # the first two reads fail: the step's two attempts in gen 1
            return up.answer(request, 503, {"error": "profile service warming up"})
        return up.answer(request, 200, {"id": int(request.match_info["id"]), "name": "Ada Lovelace"})

    async def records(request: web.Request) -> web.Response:
        return up.answer(request, 200, {"records": RECORDS})

    async def sink(request: web.Request) -> web.Response:
        body = await request.json()
        refused = body["key"] == "r2" and sum(1 for k, _ in up.sink if k == "r2") < 2
        status = 422 if refused else 201
        up.sink.append((body["key"], status))
        if refused:
            return up.answer(request, status, {"error": "name rejected", "field": "name"})
        return up.answer(request, status, {"id": f"dest-{body['key']}"})

    async def notify(request: web.Request) -> web.Response:
        up.notified.append(await request.json())
        if len(up.notified) == 1:
            return up.answer(request, 422, {"error": "notification channel not configured"})
        return up.answer(request, 200, {"sent": True})

    app = web.Application()
    app.router.add_post("/login", login)
    app.router.add_get("/users/{id}", user)
    app.router.add_get("/records", records)
    app.router.add_post("/sink", sink)
    app.router.add_post("/notify", notify)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    up.url = f"http://127.0.0.1:{port}"
    return runner


def _flow(upstream: str) -> FlowDefinition:
    once: dict[str, Any] = {"delays_s": []}
    return FlowDefinition.model_validate({
        "tenant_id": "tenant-a", "id": "chain", "name": "Chain", "version": 1,
        "steps": [
            {"name": "login", "action": "http_request", "retry": once,
             "input": {"method": "POST", "url": upstream + "/login", "body": {"user": "{{ trigger.user }}"}},
             "extract": {"user_id": "body.id"}},
            {"name": "profile", "action": "http_request", "retry": {"delays_s": [1]},
             "input": {"method": "GET", "url": upstream + "/users/{{ vars.user_id }}"}},
            {"name": "sync", "action": "sync_records", "retry": once,
             "input": {"source": {"kind": "http", "url": upstream + "/records", "records_path": "records"},
                       "destination": {"kind": "http", "url": upstream + "/sink"},
                       "key": "id", "updated_at": "updated_at", "mapping": {"key": "id", "name": "name"}}},
            {"name": "notify", "action": "http_request", "retry": once,
             "input": {"method": "POST", "url": upstream + "/notify",
                       "body": {"user": "{{ vars.user_id }}", "name": "{{ steps.profile.output.body.name }}"}}},
        ],
    })  # fmt: skip


@dataclass
class Env:
    sandbox: Sandbox
    stack: Stack
    upstream: Upstream
    key: str

    async def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.stack["api"].url, timeout=10) as client:
            return await client.request(method, path, headers={"Authorization": f"Bearer {self.key}"}, **kwargs)

    async def trigger(self, payload: Any) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{self.stack['ingest'].url}/v1/flows/chain/trigger", json={"input": payload},
                                  headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        assert r.status_code == 202, r.text
        return str(r.json()["run_id"])

    async def wait(self, run_id: str, within: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            r = await self.api("GET", f"/v1/runs/{run_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                return dict(r.json())
            assert r.status_code in (200, 404), r.text
            assert time.monotonic() < deadline, f"{run_id} did not end: {r.text}\n{self.stack['executor'].log_tail()}"
            await asyncio.sleep(0.05)

    async def retry(self, run_id: str) -> dict[str, Any]:
        r = await self.api("POST", f"/v1/runs/{run_id}/retry", json={"strategy": "FROM_FAILED_STEP"})
        assert r.status_code == 202, r.text
        assert r.json()["retry_of"] == run_id
        return await self.wait(r.json()["run_id"])

    async def started_steps(self, run_id: str) -> list[str]:
        r = await self.api("GET", f"/v1/runs/{run_id}/events", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return [e["payload"]["step"] for e in r.json()["data"] if e["type"] == "StepStarted"]

    async def retries_of(self, run_id: str) -> list[str]:
        r = await self.api("GET", "/v1/runs", params={"retry_of": run_id})
        assert r.status_code == 200, r.text
        return [run["id"] for run in r.json()["data"]]


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        upstream = Upstream()
        runner = await _upstream(upstream)
        conn = await connect(infra.database_url, sandbox.schema)
        try:
            await ensure_tenant(conn, "tenant-a", "A")
            _, key = await create_api_key(conn, "tenant-a")
        finally:
            await conn.close()
        flow = _flow(upstream.url)
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [
            FlowVersionPublished(tenant_id=flow.tenant_id, flow_id=flow.id, flow_version=1, flow=flow)
        ])  # fmt: skip
        stack = Stack.build(
            sandbox,
            ("ingest", "executor", "projector", "api"),
            tmp_path_factory.mktemp("logs"),
            FLOWTRAIL_EXECUTOR_TIME_SCALE="0.01",
            FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS="true",
        )
        await stack.start()
        try:
            conn = await connect(infra.database_url, sandbox.schema)
            try:
                deadline = time.monotonic() + 30
                while await conn.fetchval("SELECT count(*) FROM flows") < 1:
                    assert time.monotonic() < deadline, "flow not projected"
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
            yield Env(sandbox, stack, upstream, key)
        finally:
            stack.stop()
            await runner.cleanup()


async def test_a_retry_of_a_retry_of_a_retry_runs_each_succeeded_step_once_and_links_the_runs(env: Env) -> None:
    up = env.upstream
    # Generation 1: login succeeds, the profile read fails twice (two attempts) and ends the run.
    gen1 = await env.wait(await env.trigger({"user": "ada"}))
    assert (gen1["status"], gen1["failed_step"]) == ("FAILED", "profile")

    # Generation 2: login reused; the profile read renders the reused extraction; r2 is refused; notify fails.
    gen2 = await env.retry(gen1["id"])
    assert (gen2["status"], gen2["failed_step"]) == ("FAILED", "notify"), gen2
    assert await env.started_steps(gen2["id"]) == ["profile", "sync", "notify"]

    # Generation 3: login and profile reused, the sync runs again for r2 only (refused again), notify succeeds.
    gen3 = await env.retry(gen2["id"])
    assert gen3["status"] == "PARTIAL", gen3
    assert await env.started_steps(gen3["id"]) == ["sync", "notify"]

    # Generation 4: everything but the sync reused; r2 goes through.
    gen4 = await env.retry(gen3["id"])
    assert gen4["status"] == "SUCCEEDED", gen4
    assert await env.started_steps(gen4["id"]) == ["sync"]

    # The upstream saw each successful call once across the chain.
    assert up.calls["POST /login"] == [200]
    assert up.calls["GET /users/42"] == [503, 503, 200]  # the extracted user id, rendered in gen 2
    assert up.calls["POST /notify"] == [422, 200]
    assert [b["user"] for b in up.notified] == [42, 42] and up.notified[1]["name"] == "Ada Lovelace"
    assert Counter(k for k, status in up.sink if status == 201) == {"r1": 1, "r2": 1}
    assert [s for k, s in up.sink if k == "r2"] == [422, 422, 201]
    # A sync with failed records reads its window again to find them (gens 2, 3 and 4); it writes only those.
    assert up.calls["GET /records"] == [200, 200, 200]

    # The timeline: reused steps in flow order, with action, input and the run where they ran.
    steps = gen4["steps"]
    assert [s["name"] for s in steps] == ["login", "profile", "sync", "notify"]
    assert [s["position"] for s in steps] == [0, 1, 2, 3]
    assert [s["status"] for s in steps] == ["SUCCEEDED"] * 4
    assert [s["action"] for s in steps] == ["http_request", "http_request", "sync_records", "http_request"]
    assert [s["reused_from"] for s in steps] == [gen1["id"], gen2["id"], None, gen3["id"]]
    login, profile, _, notify = steps
    assert login["input"]["url"] == up.url + "/login" and login["extractions"] == {"user_id": 42}
    assert profile["input"]["url"] == up.url + "/users/42" and profile["output"]["body"]["name"] == "Ada Lovelace"
    assert notify["input"]["body"] == {"user": 42, "name": "Ada Lovelace"}
    gen3_steps = {s["name"]: s for s in (await env.api("GET", f"/v1/runs/{gen3['id']}")).json()["steps"]}
    assert gen3_steps["login"]["reused_from"] == gen1["id"]  # where it ran, not the run retried
    assert gen3_steps["sync"]["reused_from"] is None and gen3_steps["notify"]["reused_from"] is None

    # Lineage both ways, and the runs list filters by it.
    chain = [gen1, gen2, gen3, gen4]
    for older, newer in itertools.pairwise(chain):
        assert newer["retry_of"] == older["id"] and newer["retry_strategy"] == "FROM_FAILED_STEP"
        detail = (await env.api("GET", f"/v1/runs/{older['id']}")).json()
        assert [(r["id"], r["strategy"], r["status"]) for r in detail["retries"]] == [
            (newer["id"], "FROM_FAILED_STEP", newer["status"])
        ]
        assert await env.retries_of(older["id"]) == [newer["id"]]
    assert gen1["retry_of"] is None and gen1["retry_strategy"] is None
    assert gen4["retries"] == [] and await env.retries_of(gen4["id"]) == []

    # A rebuild from the ledger equals the live read models (`flowtrail projector verify`).
    settings = ProjectorSettings(
        kafka_bootstrap=env.sandbox.infra.kafka_bootstrap,
        database_url=env.sandbox.infra.database_url,
        database_schema=env.sandbox.schema,
        topic_prefix=env.sandbox.topics.prefix,
    )
    lines: list[str] = []
    outcome = await rebuild.run(settings, swap=False, progress=lines.append)
    assert outcome.comparison.equal, (outcome.comparison.differing_tables, lines)
