"""One connector registry, on real processes: a connector registered with `POST /v1/connectors` is what a step that
names it uses — a PostgreSQL connector for `database_query`, an HTTP connector (with a header read from the tenant's
secrets store) for `sync_records` — and another tenant's connector of the same name is never reached."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.conftest import Infra
from tests.harness import Env, running, stub_upstream

API_KEY = "shop-key-4711"


async def _orders(request: web.Request) -> web.Response:
    """A loopback source answering only requests that carry the connector's header."""
    if request.headers.get("X-Api-Key") != API_KEY:
        return web.json_response({"error": "bad key"}, status=401)
    return web.json_response({"orders": [{"id": "o-1", "total": 3}, {"id": "o-2", "total": 5}]})


async def _sink(request: web.Request) -> web.Response:
    return web.json_response({"id": (await request.json())["order"]}, status=201)


async def test_steps_use_the_connectors_the_api_registered(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    loopback = {"FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true", "FLOWTRAIL_INGEST_SCHEDULER": "false"}
    async with stub_upstream({("GET", "/orders"): _orders, ("POST", "/sink"): _sink}) as shop, running(
        infra, tmp_path_factory, keys={"t1": "t1", "t2": "t2"}, env=loopback
    ) as env:  # fmt: skip
        await _uses_them(env, shop.url)
        assert shop.requests and {c.headers.get("X-Api-Key") for c in shop.seen("/orders")} == {API_KEY}
        await _another_tenant(env)


async def _uses_them(env: Env, shop: str) -> None:
    stored = await env.api("PUT", "/v1/secrets/SHOP_KEY", json={"value": API_KEY})
    assert stored.status_code in (200, 201)
    for body in (
        {"name": "warehouse", "kind": "postgresql", "config": {"dsn": env.infra.database_url}},
        {"name": "shop", "kind": "http", "config": {"url": shop, "headers": {"X-Api-Key": "{{ secrets.SHOP_KEY }}"}}},
    ):
        await env.ok("POST", "/v1/connectors", status=201, json=body)
    await env.create_flow({"id": "uses-connectors", "name": "Uses connectors", "steps": [
        {"name": "count", "action": "database_query",
         "input": {"connector": "warehouse", "query": "SELECT 41 + 1 AS answer"}},
        {"name": "sync", "action": "sync_records", "retry": {"delays_s": []}, "input": {
            "source": {"kind": "http", "connector": "shop", "path": "/orders", "records_path": "orders"},
            "destination": {"kind": "http", "connector": "shop", "path": "/sink"},
            "key": "id", "mapping": {"order": "id", "total": "total"}}},
    ]})  # fmt: skip
    run = await env.wait_status(await env.trigger("uses-connectors", {}), within=60)
    assert run["status"] == "SUCCEEDED", run
    steps = {s["name"] if "name" in s else s["step"]: s for s in run["steps"]}
    assert steps["count"]["output"]["rows"] == [{"answer": 42}], steps["count"]["output"]
    assert steps["sync"]["output"]["counters"]["written"] == 2
    # The header came from the connector (checked by the caller), its value from the store.
    assert API_KEY not in str(run)


async def _another_tenant(env: Env) -> None:
    """Another tenant has no connector of that name: its step names the registry, not this tenant's connector."""
    lone = {"id": "borrow", "name": "Borrow", "steps": [
        {"name": "count", "action": "database_query", "retry": {"delays_s": []},
         "input": {"connector": "warehouse", "query": "SELECT 1"}}]}  # fmt: skip
    await env.create_flow(lone, "t2")
    run = await env.wait_status(await env.trigger("borrow", {}, "t2"), within=60, key="t2")
    assert run["status"] == "FAILED" and run["error"]["code"] == "unknown_connector", run
    assert "POST /v1/connectors" in run["error"]["message"]
