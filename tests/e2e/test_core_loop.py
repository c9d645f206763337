"""The core loop on real processes: trigger → ingest → Kafka → executor → ledger → projector → PostgreSQL → API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from schemas.flows import FlowDefinition
from tests.conftest import Infra
from tests.harness import Env, answer, flow, running, stub_upstream


async def _order(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["id"], "total": 12.5, "lines": 2})


# The local HTTP server the flows call: an order source and an endpoint that rejects input.
ROUTES = {("GET", "/orders/{id}"): _order, ("POST", "/reject"): answer({"error": "unknown sku 'X-1'"}, 422)}


def _flows(upstream: str) -> list[FlowDefinition]:
    return [
        flow("tenant-a", "orders", [
            {"name": "fetch", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/orders/{{ trigger.order_id }}"},
             "assertions": [{"expression": "status", "expected": 200}],
             "extract": {"total": "body.total"}},
            {"name": "shape", "action": "transform",
             "input": {"output": {"order": "{{ steps.fetch.output.body.id }}", "total": "{{ vars.total }}"}}},
            {"name": "settle", "action": "delay", "input": {"seconds": 0.05}},
        ]),
        flow("tenant-a", "broken", [
            {"name": "prepare", "action": "transform", "input": {"output": {"sku": "X-1"}}},
            {"name": "reject", "action": "http_request",
             "input": {"method": "POST", "url": upstream + "/reject",
                       "body": {"sku": "{{ steps.prepare.output.sku }}"}}},
            {"name": "never", "action": "delay", "input": {"seconds": 0}},
        ]),
        flow("tenant-a", "slow", [
            {"name": "first", "action": "transform", "input": {"output": {"ok": True}}},
            {"name": "wait", "action": "delay", "input": {"seconds": 3}},
            {"name": "last", "action": "transform", "input": {"output": {"done": True}}},
        ]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    # The broker's minimum session timeout: a killed executor's partitions move on sooner.
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, keys={"a": "tenant-a", "b": "tenant-b"}, flows=_flows(up.url), upstream=up,
        env={"FLOWTRAIL_EXECUTOR_SESSION_TIMEOUT_S": "6"},
    ) as env:  # fmt: skip
        yield env


async def test_a_triggered_run_succeeds_with_every_step_visible(env: Env) -> None:
    run_id = await env.trigger("orders", {"order_id": "SO-1042"})
    run = await env.wait_status(run_id)

    assert run["status"] == "SUCCEEDED"
    assert run["flow_id"] == "orders" and run["flow_version"] == 1
    assert run["trigger"]["payload"] == {"order_id": "SO-1042"}
    assert [s["name"] for s in run["steps"]] == ["fetch", "shape", "settle"]
    assert all(s["status"] == "SUCCEEDED" for s in run["steps"])
    assert [s["position"] for s in run["steps"]] == [0, 1, 2]
    fetch, shape, settle = run["steps"]
    assert fetch["input"]["url"] == f"{env.upstream.url}/orders/SO-1042"
    assert fetch["output"]["status"] == 200 and fetch["output"]["body"]["id"] == "SO-1042"
    assert fetch["assertions"][0]["passed"] is True
    assert shape["output"] == {"order": "SO-1042", "total": 12.5}
    assert settle["duration_ms"] >= 50
    assert run["duration_ms"] >= settle["duration_ms"]

    events = await env.events(run_id)  # gap-free
    assert [e["type"] for e in events] == [
        "RunRequested", "RunQueued", "RunStarted",
        "StepStarted", "StepSucceeded", "StepStarted", "StepSucceeded", "StepStarted", "StepSucceeded",
        "RunSucceeded",
    ]  # fmt: skip


async def test_a_failing_step_fails_the_run_with_the_error_visible(env: Env) -> None:
    run = await env.wait_status(await env.trigger("broken", {}))

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
    ids = [await env.trigger("orders", {"order_id": f"P-{i}"}) for i in range(5)]
    for run_id in ids:
        await env.wait_status(run_id)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "flow_id": "orders"}
        if cursor:
            params["cursor"] = cursor
        page = await env.ok("GET", "/v1/runs", params=params)
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
    run_id = await env.trigger("orders", {"order_id": "T-1"})
    await env.wait_status(run_id)
    r = await env.api("GET", f"/v1/runs/{run_id}", "b")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["request_id"]
    assert (await env.ok("GET", "/v1/runs", "b"))["data"] == []
    # Tenant B cannot trigger tenant A's flow either.
    assert (await env.ingest("POST", "/v1/flows/orders/trigger", "b", json={"input": {}})).status_code == 404


async def test_bad_triggers_get_a_clear_error(env: Env) -> None:
    r = await env.http.post(f"{env.url('ingest')}/v1/flows/orders/trigger", json={"input": {}})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await env.ingest("POST", "/v1/flows/nope/trigger", json={})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = await env.ingest("POST", "/v1/flows/orders/trigger", json={"input": {}, "inputs": [{}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = await env.ingest("POST", "/v1/flows/orders/trigger", content=b"{not json",
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


async def test_a_batch_of_inputs_becomes_one_run_each(env: Env) -> None:
    run_ids = await env.trigger_many("orders", [{"order_id": f"B-{i}"} for i in range(20)])
    assert len(set(run_ids)) == 20
    finals = [await env.wait_status(run_id) for run_id in run_ids]
    assert {f["status"] for f in finals} == {"SUCCEEDED"}
    assert sorted(f["trigger"]["payload"]["order_id"] for f in finals) == sorted(f"B-{i}" for i in range(20))


async def test_an_executor_killed_mid_run_resumes_it_from_the_ledger(env: Env) -> None:
    run_id = await env.trigger("slow", {})
    await env.wait_step(run_id, "wait", {"RUNNING"}, within=20)
    await env.stack["executor"].restart()

    run = await env.wait_status(run_id, within=90)
    assert run["status"] == "SUCCEEDED"
    events = await env.events(run_id)  # gap-free
    assert [e["type"] for e in events].count("RunSucceeded") == 1
    # The durable timer counted from the recorded start: the whole run took about the delay, not twice it.
    wait = next(s for s in run["steps"] if s["name"] == "wait")
    assert wait["status"] == "SUCCEEDED"
