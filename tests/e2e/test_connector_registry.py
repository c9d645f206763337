"""One connector registry, on real processes: a connector registered with `POST /v1/connectors` is what a step that
names it uses — a PostgreSQL connector for `database_query`, an HTTP connector (with a header read from the tenant's
secrets store) for `sync_records` — and another tenant's connector of the same name is never reached."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from aiohttp import web

from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from tests.conftest import Sandbox
from tests.e2e.stack import Stack, free_port

TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}
API_KEY = "shop-key-4711"


async def _shop() -> tuple[web.AppRunner, str, list[str]]:
    """A loopback source answering only requests that carry the connector's header."""
    seen: list[str] = []

    async def orders(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Api-Key", ""))
        if request.headers.get("X-Api-Key") != API_KEY:
            return web.json_response({"error": "bad key"}, status=401)
        return web.json_response({"orders": [{"id": "o-1", "total": 3}, {"id": "o-2", "total": 5}]})

    async def sink(request: web.Request) -> web.Response:
        return web.json_response({"id": (await request.json())["order"]}, status=201)

    app = web.Application()
    app.router.add_get("/orders", orders)
    app.router.add_post("/sink", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}", seen


async def _final(client: httpx.AsyncClient, api: str, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        r = await client.get(f"{api}/v1/runs/{run_id}")
        if r.status_code == 200 and r.json()["status"] in TERMINAL:
            return dict(r.json())
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.05)


async def test_steps_use_the_connectors_the_api_registered(sandbox: Sandbox, tmp_path: Any) -> None:
    conn = await connect(sandbox.infra.database_url, sandbox.schema)
    try:
        await ensure_tenant(conn, "t1", "T1")
        await ensure_tenant(conn, "t2", "T2")
        key = (await create_api_key(conn, "t1"))[1]
        other = (await create_api_key(conn, "t2"))[1]
    finally:
        await conn.close()
    runner, shop, seen = await _shop()
    loopback = {"FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true", "FLOWTRAIL_INGEST_SCHEDULER": "false"}
    stack = Stack.build(sandbox, ("ingest", "executor", "projector", "api"), tmp_path, **loopback)
    await stack.start()
    api, ingest = stack["api"].url, stack["ingest"].url
    try:
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            assert (await client.put(f"{api}/v1/secrets/SHOP_KEY", json={"value": API_KEY})).status_code in (200, 201)
            for body in (
                {"name": "warehouse", "kind": "postgresql", "config": {"dsn": sandbox.infra.database_url}},
                {"name": "shop", "kind": "http",
                 "config": {"url": shop, "headers": {"X-Api-Key": "{{ secrets.SHOP_KEY }}"}}},
            ):  # fmt: skip
                created = await client.post(f"{api}/v1/connectors", json=body)
                assert created.status_code == 201, created.text
            flow = {"id": "uses-connectors", "name": "Uses connectors", "steps": [
                {"name": "count", "action": "database_query",
                 "input": {"connector": "warehouse", "query": "SELECT 41 + 1 AS answer"}},
                {"name": "sync", "action": "sync_records", "retry": {"delays_s": []}, "input": {
                    "source": {"kind": "http", "connector": "shop", "path": "/orders", "records_path": "orders"},
                    "destination": {"kind": "http", "connector": "shop", "path": "/sink"},
                    "key": "id", "mapping": {"order": "id", "total": "total"}}},
            ]}  # fmt: skip
            published = await client.post(f"{api}/v1/flows", json=flow)
            # 201 once the projector shows it, 202 when written but not yet projected: either way it is published.
            assert published.status_code in (201, 202), published.text
            deadline = time.monotonic() + 30
            url = f"{ingest}/v1/flows/uses-connectors/trigger"
            while (triggered := await client.post(url, json={"input": {}})).status_code == 404:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            run = await _final(client, api, triggered.json()["run_id"])
            assert run["status"] == "SUCCEEDED", run
            steps = {s["name"] if "name" in s else s["step"]: s for s in run["steps"]}
            assert steps["count"]["output"]["rows"] == [{"answer": 42}], steps["count"]["output"]
            assert steps["sync"]["output"]["counters"]["written"] == 2
            assert seen and set(seen) == {API_KEY}  # the header came from the connector, its value from the store
            assert API_KEY not in str(run)

        # Another tenant has no connector of that name: its step names the registry, not this tenant's connector.
        async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {other}"}) as client:
            lone = {"id": "borrow", "name": "Borrow", "steps": [
                {"name": "count", "action": "database_query", "retry": {"delays_s": []},
                 "input": {"connector": "warehouse", "query": "SELECT 1"}}]}  # fmt: skip
            assert (await client.post(f"{api}/v1/flows", json=lone)).status_code in (201, 202)
            deadline = time.monotonic() + 30
            url = f"{ingest}/v1/flows/borrow/trigger"
            while (answer := await client.post(url, json={"input": {}})).status_code == 404:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            run = await _final(client, api, answer.json()["run_id"])
            assert run["status"] == "FAILED" and run["error"]["code"] == "unknown_connector", run
            assert "POST /v1/connectors" in run["error"]["message"]
    finally:
        stack.stop()
        await runner.cleanup()
