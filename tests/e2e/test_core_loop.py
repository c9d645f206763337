"""The core loop on real processes: trigger → ingest → Kafka → executor → ledger → projector → PostgreSQL → API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port

TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}


@dataclass
class Env:
    sandbox: Sandbox
    stack: Stack
    upstream: str
    key_a: str
    key_b: str

    @property
    def ingest(self) -> str:
        return self.stack["ingest"].url

    @property
    def api(self) -> str:
        return self.stack["api"].url


async def _upstream() -> tuple[web.AppRunner, str]:
    """The local HTTP server the flows call: an order source and an endpoint that rejects input."""

    async def order(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "total": 12.5, "lines": 2})

    async def reject(request: web.Request) -> web.Response:
        return web.json_response({"error": "unknown sku 'X-1'"}, status=422)

    app = web.Application()
    app.router.add_get("/orders/{id}", order)
    app.router.add_post("/reject", reject)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _flows(upstream: str) -> list[FlowDefinition]:
    common = {"tenant_id": "tenant-a", "version": 1}
    return [
        FlowDefinition.model_validate({**common, "id": "orders", "name": "Orders", "steps": [
            {"name": "fetch", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/orders/{{ trigger.order_id }}"},
             "assertions": [{"expression": "status", "expected": 200}],
             "extract": {"total": "body.total"}},
            {"name": "shape", "action": "transform",
             "input": {"output": {"order": "{{ steps.fetch.output.body.id }}", "total": "{{ vars.total }}"}}},
            {"name": "settle", "action": "delay", "input": {"seconds": 0.05}},
        ]}),
        FlowDefinition.model_validate({**common, "id": "broken", "name": "Broken", "steps": [
            {"name": "prepare", "action": "transform", "input": {"output": {"sku": "X-1"}}},
            {"name": "reject", "action": "http_request",
             "input": {"method": "POST", "url": upstream + "/reject",
                       "body": {"sku": "{{ steps.prepare.output.sku }}"}}},
            {"name": "never", "action": "delay", "input": {"seconds": 0}},
        ]}),
        FlowDefinition.model_validate({**common, "id": "slow", "name": "Slow", "steps": [
            {"name": "first", "action": "transform", "input": {"output": {"ok": True}}},
            {"name": "wait", "action": "delay", "input": {"seconds": 3}},
            {"name": "last", "action": "transform", "input": {"output": {"done": True}}},
        ]}),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        runner, upstream = await _upstream()
        conn = await connect(infra.database_url, sandbox.schema)
        try:
            await ensure_tenant(conn, "tenant-a", "A")
            await ensure_tenant(conn, "tenant-b", "B")
            _, key_a = await create_api_key(conn, "tenant-a")
            _, key_b = await create_api_key(conn, "tenant-b")
        finally:
            await conn.close()
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [
            FlowVersionPublished(tenant_id=f.tenant_id, flow_id=f.id, flow_version=1, flow=f) for f in _flows(upstream)
        ])  # fmt: skip
        # The broker's minimum session timeout: a killed executor's partitions move on sooner.
        stack = Stack.build(
            sandbox,
            ("ingest", "executor", "projector", "api"),
            tmp_path_factory.mktemp("logs"),
            FLOWTRAIL_EXECUTOR_SESSION_TIMEOUT_S="6",
        )
        await stack.start()
        try:
            conn = await connect(infra.database_url, sandbox.schema)
            try:
                deadline = time.monotonic() + 30
                while await conn.fetchval("SELECT count(*) FROM flows") < 3:
                    assert time.monotonic() < deadline, "flows not projected"
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
            yield Env(sandbox, stack, upstream, key_a, key_b)
        finally:
            stack.stop()
            await runner.cleanup()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def trigger(env: Env, flow_id: str, payload: Any, key: str | None = None) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{env.ingest}/v1/flows/{flow_id}/trigger", json={"input": payload},
                              headers=_auth(key or env.key_a))  # fmt: skip
    assert r.status_code == 202, r.text
    return str(r.json()["run_id"])


async def wait_final(env: Env, run_id: str, within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            r = await client.get(f"{env.api}/v1/runs/{run_id}", headers=_auth(env.key_a))
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                return dict(r.json())
            assert r.status_code in (200, 404), r.text
            assert time.monotonic() < deadline, f"run {run_id} not final: {r.text}\n{env.stack['executor'].log_tail()}"
            await asyncio.sleep(0.05)


async def events_of(env: Env, run_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{env.api}/v1/runs/{run_id}/events", headers=_auth(env.key_a))
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


async def test_a_triggered_run_succeeds_with_every_step_visible(env: Env) -> None:
    run_id = await trigger(env, "orders", {"order_id": "SO-1042"})
    run = await wait_final(env, run_id)

    assert run["status"] == "SUCCEEDED"
    assert run["flow_id"] == "orders" and run["flow_version"] == 1
    assert run["trigger"]["payload"] == {"order_id": "SO-1042"}
    assert [s["name"] for s in run["steps"]] == ["fetch", "shape", "settle"]
    assert all(s["status"] == "SUCCEEDED" for s in run["steps"])
    assert [s["position"] for s in run["steps"]] == [0, 1, 2]
    fetch, shape, settle = run["steps"]
    assert fetch["input"]["url"] == f"{env.upstream}/orders/SO-1042"
    assert fetch["output"]["status"] == 200 and fetch["output"]["body"]["id"] == "SO-1042"
    assert fetch["assertions"][0]["passed"] is True
    assert shape["output"] == {"order": "SO-1042", "total": 12.5}
    assert settle["duration_ms"] >= 50
    assert run["duration_ms"] >= settle["duration_ms"]

    events = await events_of(env, run_id)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "RunRequested", "RunQueued", "RunStarted",
        "StepStarted", "StepSucceeded", "StepStarted", "StepSucceeded", "StepStarted", "StepSucceeded",
        "RunSucceeded",
    ]  # fmt: skip


async def test_a_failing_step_fails_the_run_with_the_error_visible(env: Env) -> None:
    run = await wait_final(env, await trigger(env, "broken", {}))

    assert run["status"] == "FAILED"
    assert run["failed_step"] == "reject"
    assert "422" in run["error_message"]
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["prepare"]["status"] == "SUCCEEDED"
    assert steps["reject"]["status"] == "FAILED"
    assert steps["reject"]["error"]["category"] == "VALIDATION"
    assert steps["reject"]["output"]["body"] == {"error": "unknown sku 'X-1'"}
    assert "never" not in steps  # nothing runs after the failure


async def test_runs_list_newest_first_with_cursor_pages(env: Env) -> None:
    ids = [await trigger(env, "orders", {"order_id": f"P-{i}"}) for i in range(5)]
    for run_id in ids:
        await wait_final(env, run_id)
    seen: list[dict[str, Any]] = []
    cursor = None
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            params: dict[str, Any] = {"limit": 2, "flow_id": "orders"}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get(f"{env.api}/v1/runs", params=params, headers=_auth(env.key_a))).json()
            assert len(page["data"]) <= 2
            seen += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    listed = [r["id"] for r in seen]
    assert len(listed) == len(set(listed))
    assert set(ids) <= set(listed)
    created = [r["created_at"] for r in seen]
    assert created == sorted(created, reverse=True)
    # The five just made are the newest, newest first.
    assert listed[:5] == list(reversed(ids))


async def test_another_tenant_sees_none_of_these_runs(env: Env) -> None:
    run_id = await trigger(env, "orders", {"order_id": "T-1"})
    await wait_final(env, run_id)
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{env.api}/v1/runs/{run_id}", headers=_auth(env.key_b))
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["request_id"]
        listed = (await client.get(f"{env.api}/v1/runs", headers=_auth(env.key_b))).json()["data"]
        assert listed == []
        # Tenant B cannot trigger tenant A's flow either.
        r = await client.post(f"{env.ingest}/v1/flows/orders/trigger", json={"input": {}}, headers=_auth(env.key_b))
        assert r.status_code == 404


async def test_bad_triggers_get_a_clear_error(env: Env) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{env.ingest}/v1/flows/orders/trigger", json={"input": {}})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await client.post(f"{env.ingest}/v1/flows/nope/trigger", json={}, headers=_auth(env.key_a))
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        r = await client.post(f"{env.ingest}/v1/flows/orders/trigger", json={"input": {}, "inputs": [{}]},
                              headers=_auth(env.key_a))  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        r = await client.post(f"{env.ingest}/v1/flows/orders/trigger", content=b"{not json",
                              headers={**_auth(env.key_a), "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


async def test_a_batch_of_inputs_becomes_one_run_each(env: Env) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        inputs = [{"order_id": f"B-{i}"} for i in range(20)]
        url = f"{env.ingest}/v1/flows/orders/trigger"
        r = await client.post(url, json={"inputs": inputs}, headers=_auth(env.key_a))
    assert r.status_code == 202
    run_ids = r.json()["run_ids"]
    assert len(set(run_ids)) == 20
    finals = [await wait_final(env, run_id) for run_id in run_ids]
    assert {f["status"] for f in finals} == {"SUCCEEDED"}
    assert sorted(f["trigger"]["payload"]["order_id"] for f in finals) == sorted(f"B-{i}" for i in range(20))


async def test_an_executor_killed_mid_run_resumes_it_from_the_ledger(env: Env) -> None:
    run_id = await trigger(env, "slow", {})
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            r = await client.get(f"{env.api}/v1/runs/{run_id}", headers=_auth(env.key_a))
            steps = {s["name"]: s["status"] for s in r.json().get("steps", [])} if r.status_code == 200 else {}
            if steps.get("wait") == "RUNNING":
                break
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.02)
    executor = env.stack["executor"]
    executor.kill()
    executor.start()
    await executor.wait_healthy()

    run = await wait_final(env, run_id, within=90)
    assert run["status"] == "SUCCEEDED"
    events = await events_of(env, run_id)
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events].count("RunSucceeded") == 1
    # The durable timer counted from the recorded start: the whole run took about the delay, not twice it.
    wait = next(s for s in run["steps"] if s["name"] == "wait")
    assert wait["status"] == "SUCCEEDED"
