"""Three flows modelled on the seeds, end to end on real processes and the real broker, with loopback upstreams.

- "Shopify → NetSuite Orders" (seeds 000, 003): a cursor-windowed order sync with one order NetSuite refuses,
  ending PARTIAL with that order's error; the retry of the PARTIAL run sends only that order again.
- "Create user then fetch it" (seed 004): an API test flow with assertions and an extracted variable.
- "Ship order on approval": paused on human_input, resumed with its request id.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web

from deploy.launcher import demo_flows
from deploy.launcher.demo import ANSWER, run_demo
from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.common.settings import CommonSettings
from tests.conftest import Infra, make_sandbox
from tests.e2e.stack import Stack, free_port

TENANT = "acme"
TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}


# ---------------------------------------------------------------- loopback upstreams


def shopify_order(number: int, updated_at: datetime, email: str | None = "ada@example.com") -> dict[str, Any]:
    """An order as Shopify's Admin API lists it."""
    return {"id": 450789469 + number, "order_number": number, "name": f"#{number}", "email": email,
            "financial_status": "paid", "total_price": f"{number / 10:.2f}", "currency": "USD",
            "created_at": (updated_at - timedelta(minutes=5)).isoformat(), "updated_at": updated_at.isoformat(),
            "customer": {"first_name": "Ada", "last_name": "Lovelace"}}  # fmt: skip


@dataclass
class Shop:
    """Lists orders updated in [updated_at_min, updated_at_max] (Shopify's bounds), two a page, oldest first."""

    orders: dict[int, dict[str, Any]] = field(default_factory=dict)  # by Shopify id
    requests: list[dict[str, str]] = field(default_factory=list)

    def add(self, order: dict[str, Any]) -> None:
        self.orders[order["id"]] = order

    async def list_orders(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.requests.append(query)
        low, high = (datetime.fromisoformat(query[p]) if p in query else None
                     for p in ("updated_at_min", "updated_at_max"))  # fmt: skip
        selected = sorted(
            (o for o in self.orders.values() if (low is None or datetime.fromisoformat(o["updated_at"]) >= low)
             and (high is None or datetime.fromisoformat(o["updated_at"]) <= high)),
            key=lambda o: (o["updated_at"], o["id"]),
        )  # fmt: skip
        start = int(query.get("page_info", "0"))
        following = str(start + 2) if start + 2 < len(selected) else None
        return web.json_response({"orders": selected[start : start + 2], "next_page_info": following})

    async def get_order(self, request: web.Request) -> web.Response:
        found = next((o for o in self.orders.values() if str(o["order_number"]) == request.match_info["number"]), None)
        if found is None:
            return web.json_response({"errors": "Not Found"}, status=404)
        return web.json_response({"order": found})


@dataclass
class NetSuite:
    """Creates sales orders; refuses one without a customer email the way NetSuite's REST API does (400)."""

    received: list[dict[str, Any]] = field(default_factory=list)  # every request body, in order
    created: dict[str, str] = field(default_factory=dict)  # Idempotency-Key → internal id

    async def create_sales_order(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        if not body.get("email"):
            return web.json_response({
                "type": "https://www.rfc-editor.org/rfc/rfc9110.html#section-15.5.1", "title": "Bad Request",
                "status": 400, "o:errorDetails": [{"detail": "Please enter value(s) for: Customer Email",
                                                   "o:errorPath": "email", "o:errorCode": "USER_ERROR"}],
            }, status=400)  # fmt: skip
        internal_id = self.created.setdefault(request.headers["Idempotency-Key"], str(9000 + len(self.created)))
        return web.json_response({"id": internal_id}, status=201)


@dataclass
class UsersApi:
    """A service under test: POST /api/users creates a user, GET /api/users/{id} reads it back."""

    misbehave: bool = False  # the read answers a stale email, as after a bad cache deploy
    users: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = {"id": f"usr_{len(self.users) + 1:04d}", **body}
        self.users[user["id"]] = user
        return web.json_response(user, status=201)

    async def get(self, request: web.Request) -> web.Response:
        user = self.users.get(request.match_info["id"])
        if user is None:
            return web.json_response({"error": "no such user"}, status=404)
        return web.json_response({**user, "email": "ada@old.example"} if self.misbehave else user)


@dataclass
class Warehouse:
    shipments: list[dict[str, Any]] = field(default_factory=list)

    async def ship(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.shipments.append(body)
        return web.json_response({"shipment_id": f"shp_{len(self.shipments)}", **body}, status=201)


@dataclass
class Upstream:
    shop: Shop = field(default_factory=Shop)
    netsuite: NetSuite = field(default_factory=NetSuite)
    users: UsersApi = field(default_factory=UsersApi)
    warehouse: Warehouse = field(default_factory=Warehouse)
    url: str = ""


async def _serve(up: Upstream) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/shopify/admin/api/2024-10/orders.json", up.shop.list_orders)
    app.router.add_get("/shopify/admin/api/2024-10/orders/{number}.json", up.shop.get_order)
    app.router.add_post("/netsuite/services/rest/record/v1/salesOrder", up.netsuite.create_sales_order)
    app.router.add_post("/api/users", up.users.create)
    app.router.add_get("/api/users/{id}", up.users.get)
    app.router.add_post("/warehouse/shipments", up.warehouse.ship)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    up.url = f"http://127.0.0.1:{port}"
    return runner


# ---------------------------------------------------------------- the flows


def seed_flows(upstream: str) -> list[FlowDefinition]:
    order_sync = {
        "id": "shopify-netsuite-orders", "name": "Shopify → NetSuite Orders",
        "tags": ["shopify", "netsuite"],
        "trigger": {"type": "schedule", "interval_s": 900},  # every_15m (seed 003); the test triggers it by API
        "steps": [{
            "name": "sync_orders", "action": "sync_records", "retry": {"delays_s": []},
            "input": {
                "source": {"kind": "http", "url": upstream + "/shopify/admin/api/2024-10/orders.json",
                           "records_path": "orders", "next_page_path": "next_page_info", "cursor_param": "page_info",
                           "params": {"status": "any"}},
                "destination": {"kind": "http", "url": upstream + "/netsuite/services/rest/record/v1/salesOrder"},
                "key": "id",
                "updated_at": "updated_at",
                "mapping": {"order_number": "to_string(order_number)", "status": "financial_status",
                            "total": "to_number(total_price)", "currency": "currency", "placed_at": "created_at",
                            "email": "email"},
                "required": ["order_number"],
                "entity": "order", "system": "shopify", "dest_system": "netsuite",
            },
        }],
    }  # fmt: skip
    api_test = {
        "id": "create-user-then-fetch", "name": "Create user then fetch it",
        "tags": ["api-test"],
        "steps": [
            {"name": "create_user", "action": "http_request",
             "input": {"method": "POST", "url": upstream + "/api/users",
                       "body": {"name": "Ada Lovelace", "email": "ada@example.com"}},
             "assertions": [{"expression": "status", "expected": 201},
                            {"expression": "body.id", "operator": "exists"}],
             "extract": {"user_id": "body.id"}},
            {"name": "fetch_user", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/api/users/{{ vars.user_id }}"},
             "assertions": [{"expression": "status", "expected": 200},
                            {"expression": "body.email", "expected": "ada@example.com"}]},
        ],
    }  # fmt: skip
    approval = {
        "id": "ship-on-approval", "name": "Ship order on approval",
        "steps": [
            {"name": "prepare", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/shopify/admin/api/2024-10/orders/{{ trigger.order }}.json"},
             "assertions": [{"expression": "status", "expected": 200}],
             "extract": {"order_name": "body.order.name", "total": "body.order.total_price"}},
            {"name": "approve", "action": "human_input", "timeout_s": 3600,
             "input": {"question": "Ship order {{ vars.order_name }} ({{ vars.total }} USD)?",
                       "fields": ["approved", "carrier"]}},
            {"name": "ship", "action": "http_request", "run_condition": "steps.approve.output.approved",
             "input": {"method": "POST", "url": upstream + "/warehouse/shipments",
                       "body": {"order": "{{ vars.order_name }}", "carrier": "{{ steps.approve.output.carrier }}"}},
             "assertions": [{"expression": "status", "expected": 201}]},
        ],
    }  # fmt: skip
    return [FlowDefinition.model_validate({"tenant_id": TENANT, "version": 1, **f}) for f in (order_sync, api_test,
                                                                                               approval)]  # fmt: skip


# ---------------------------------------------------------------- the stack


@dataclass
class Env:
    stack: Stack
    upstream: Upstream
    key: str
    demo_key: str
    demo_port: int

    async def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.stack["api"].url, timeout=10) as client:
            auth = {"Authorization": f"Bearer {key or self.key}"}
            return await client.request(method, path, headers=auth, **kwargs)

    async def trigger(self, flow_id: str, payload: Any = None) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{self.stack['ingest'].url}/v1/flows/{flow_id}/trigger", json={"input": payload},
                                  headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        assert r.status_code == 202, r.text
        return str(r.json()["run_id"])

    async def wait(self, run_id: str, statuses: set[str] = TERMINAL, within: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            r = await self.api("GET", f"/v1/runs/{run_id}")
            if r.status_code == 200 and r.json()["status"] in statuses:
                return dict(r.json())
            assert r.status_code in (200, 404), r.text
            assert time.monotonic() < deadline, (
                f"{run_id} not {statuses}: {r.text}\n{self.stack['executor'].log_tail()}"
            )
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        upstream = Upstream()
        runner = await _serve(upstream)
        conn = await connect(infra.database_url, sandbox.schema)
        try:
            await ensure_tenant(conn, TENANT, "Acme")
            _, key = await create_api_key(conn, TENANT)
            await ensure_tenant(conn, demo_flows.DEMO_TENANT, "Demo tenant")
            _, demo_key = await create_api_key(conn, demo_flows.DEMO_TENANT)
        finally:
            await conn.close()
        # The sync flow is a schedule flow: the scheduler stays off so that only the test's triggers run it.
        stack = Stack.build(sandbox, ("ingest", "executor", "projector", "api"), tmp_path_factory.mktemp("logs"),
                            FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS="true",
                            FLOWTRAIL_INGEST_SCHEDULER="false")  # fmt: skip
        # `flowtrail demo`'s flows, pointed at this stack and at a free port for the demo's own upstream.
        demo_port = free_port()
        flows = seed_flows(upstream.url) + demo_flows.demo_flows(
            ingest=stack["ingest"].url, api=stack["api"].url, upstream=f"http://127.0.0.1:{demo_port}"
        )
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [
            FlowVersionPublished(tenant_id=f.tenant_id, flow_id=f.id, flow_version=1, flow=f) for f in flows
        ])  # fmt: skip
        await stack.start()
        try:
            conn = await connect(infra.database_url, sandbox.schema)
            try:
                deadline = time.monotonic() + 30
                while await conn.fetchval("SELECT count(*) FROM flows") < len(flows):
                    assert time.monotonic() < deadline, "flows not projected"
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
            yield Env(stack, upstream, key, demo_key, demo_port)
        finally:
            stack.stop()
            await runner.cleanup()


# ---------------------------------------------------------------- a) Shopify → NetSuite Orders


async def test_an_order_sync_with_one_refused_order_ends_partial_and_its_retry_sends_only_that_order(env: Env) -> None:
    shop, netsuite = env.upstream.shop, env.upstream.netsuite
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    for i, number in enumerate(range(1001, 1006)):
        shop.add(shopify_order(number, an_hour_ago + timedelta(minutes=i), email=None if number == 1003 else "a@b.c"))
    bad_id = str(shop.orders[450789469 + 1003]["id"])

    first = await env.wait(await env.trigger("shopify-netsuite-orders"))

    assert first["status"] == "PARTIAL", first
    assert first["records"] == {"read": 5, "transformed": 5, "written": 4, "deduped": 0, "skipped": 0, "failed": 1}
    assert "1 record(s) failed" in (first["error_message"] or "")
    window = first["cursor_window"]
    assert window["updated_since"] is None and window["updated_until"] is not None  # the first run reads everything
    # Every page was read with the run's window, the source's own params kept.
    assert [r.get("page_info") for r in shop.requests] == [None, "2", "4"]
    until = datetime.fromisoformat(window["updated_until"])
    assert all(datetime.fromisoformat(r["updated_at_max"]) == until and r["status"] == "any" for r in shop.requests)
    assert all("updated_at_min" not in r for r in shop.requests)
    breakdown = first["duration_breakdown"]  # seed 000: the sync's time split into read, transform and write
    assert breakdown["read_ms"] > 0 and breakdown["write_ms"] > 0
    assert breakdown["read_ms"] + breakdown["transform_ms"] + breakdown["write_ms"] <= breakdown["total_ms"]

    errors = (await env.api("GET", f"/v1/runs/{first['id']}/record-errors")).json()["data"]
    assert len(errors) == 1
    [error] = errors
    assert error["step"] == "sync_orders" and error["record_key"] == bad_id and error["field_path"] == "email"
    assert "Please enter value(s) for: Customer Email" in error["error"]
    assert error["raw_error"]["status"] == 400
    assert error["raw_error"]["body"]["o:errorDetails"][0]["o:errorCode"] == "USER_ERROR"

    # The four written orders are canonical records, known by their Shopify and NetSuite ids (seed 003).
    data = (await env.api("GET", "/api/public/data/order", params={"limit": 50})).json()
    assert data["entity"] == "order" and data["count"] == 4 and data["next_cursor"] is None
    by_number = {r["order_number"]: r for r in data["data"]}
    assert set(by_number) == {"1001", "1002", "1004", "1005"}
    netsuite_id = netsuite.created[f"{first['id']}:sync_orders:{450789469 + 1001}"]
    assert by_number["1001"]["external_ids"] == {"shopify": str(450789469 + 1001), "netsuite": netsuite_id}
    assert by_number["1001"]["total"] == 100.1 and by_number["1001"]["status"] == "paid"
    one = await env.api("GET", f"/api/public/data/order/{by_number['1002']['canonical_id']}")
    assert one.status_code == 200 and one.json()["order_number"] == "1002"

    # The next run reads from where the first one's window ended: only the order placed since.
    shop.add(shopify_order(1006, datetime.now(UTC)))
    second = await env.wait(await env.trigger("shopify-netsuite-orders"))
    assert second["status"] == "SUCCEEDED", second
    assert second["cursor_window"]["updated_since"] == window["updated_until"]
    assert second["records"]["read"] == 1 and second["records"]["written"] == 1
    assert datetime.fromisoformat(shop.requests[-1]["updated_at_min"]) == until

    # Someone adds the customer's email in Shopify (which moves the order's updated_at on), then retries the
    # PARTIAL run: only the refused order goes to NetSuite again.
    shop.orders[int(bad_id)] = {**shop.orders[int(bad_id)], "email": "grace@example.com",
                                "updated_at": datetime.now(UTC).isoformat()}  # fmt: skip
    sent_before = len(netsuite.received)
    r = await env.api("POST", f"/v1/runs/{first['id']}/retry", json={"strategy": "FROM_FAILED_STEP"})
    assert r.status_code == 202, r.text
    retried = await env.wait(r.json()["run_id"])

    assert retried["status"] == "SUCCEEDED", retried
    assert retried["retry_of"] == first["id"]
    assert retried["records"] == {"read": 1, "transformed": 1, "written": 1, "deduped": 0, "skipped": 0, "failed": 0}
    assert [body["order_number"] for body in netsuite.received[sent_before:]] == ["1003"]
    assert netsuite.received[-1]["email"] == "grace@example.com"
    assert (await env.api("GET", f"/v1/runs/{retried['id']}/record-errors")).json()["data"] == []
    data = (await env.api("GET", "/api/public/data/order", params={"limit": 50})).json()
    assert {r["order_number"] for r in data["data"]} == {"1001", "1002", "1003", "1004", "1005", "1006"}

    # A retry replays its original's window; the run after it still starts where the newest window ended.
    third = await env.wait(await env.trigger("shopify-netsuite-orders"))
    assert third["status"] == "SUCCEEDED", third
    assert third["cursor_window"]["updated_since"] == second["cursor_window"]["updated_until"]


# ---------------------------------------------------------------- b) an API test flow (seed 004)


async def test_an_api_test_flow_passes_then_fails_with_the_assertion_expected_and_actual(env: Env) -> None:
    env.upstream.users.misbehave = False
    passed = await env.wait(await env.trigger("create-user-then-fetch", {}))

    assert passed["status"] == "SUCCEEDED", passed
    create, fetch = passed["steps"]
    user_id = create["extractions"]["user_id"]
    assert user_id.startswith("usr_") and create["output"]["status"] == 201
    assert [(a["expression"], a["passed"]) for a in create["assertions"]] == [("status", True), ("body.id", True)]
    assert create["output"]["request"]["method"] == "POST"
    assert fetch["input"]["url"].endswith(f"/api/users/{user_id}")  # `{{ vars.user_id }}` rendered
    assert fetch["output"]["body"]["email"] == "ada@example.com" and all(a["passed"] for a in fetch["assertions"])

    env.upstream.users.misbehave = True
    failed = await env.wait(await env.trigger("create-user-then-fetch", {}))

    assert failed["status"] == "FAILED", failed
    assert failed["failed_step"] == "fetch_user"
    assert "assertion failed" in failed["error_message"] and "ada@old.example" in failed["error_message"]
    fetch = {s["name"]: s for s in failed["steps"]}["fetch_user"]
    assert fetch["status"] == "FAILED" and fetch["error"]["code"] == "assertion_failed"
    assert fetch["assertions"] == [
        {"expression": "status", "operator": "eq", "expected": 200, "actual": 200, "passed": True},
        {"expression": "body.email", "operator": "eq", "expected": "ada@example.com", "actual": "ada@old.example",
         "passed": False},
    ]  # fmt: skip
    assert fetch["output"]["body"]["email"] == "ada@old.example"  # the response that failed it, for the reader
    assert len(fetch["attempts"]) == 1  # an assertion failure is VALIDATION: not retried
    listed = await env.api("GET", "/v1/runs", params={"flow_id": "create-user-then-fetch", "status": "FAILED"})
    assert [r["id"] for r in listed.json()["data"]] == [failed["id"]]


# ---------------------------------------------------------------- c) approval on human_input


async def test_an_approval_pauses_until_resumed_with_its_request_id_then_ships(env: Env) -> None:
    env.upstream.shop.add(shopify_order(2001, datetime.now(UTC) - timedelta(days=1)))
    run_id = await env.trigger("ship-on-approval", {"order": 2001})

    paused = await env.wait(run_id, {"PAUSED"})
    waiting = paused["waiting_for"]
    assert waiting["step"] == "approve"
    assert waiting["prompt"] == {"question": "Ship order #2001 (200.10 USD)?", "fields": ["approved", "carrier"]}
    assert waiting["expires_at"] is not None
    assert env.upstream.warehouse.shipments == []  # nothing shipped while waiting

    wrong = await env.api("POST", f"/v1/runs/{run_id}/resume/req_not_this_one", json={"approved": True})
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "conflict"
    assert waiting["request_id"] in wrong.json()["error"]["message"]
    answer = {"approved": True, "carrier": "DHL", "by": "ops@acme.example"}
    r = await env.api("POST", f"/v1/runs/{run_id}/resume/{waiting['request_id']}", json=answer)
    assert r.status_code == 202, r.text

    run = await env.wait(run_id)
    assert run["status"] == "SUCCEEDED", run
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["approve"]["output"] == answer
    assert steps["ship"]["status"] == "SUCCEEDED" and steps["ship"]["output"]["status"] == 201
    assert env.upstream.warehouse.shipments == [{"order": "#2001", "carrier": "DHL"}]
    late = await env.api("POST", f"/v1/runs/{run_id}/resume/{waiting['request_id']}", json=answer)
    assert late.status_code == 409  # answered once; the run has moved on


# ---------------------------------------------------------------- `flowtrail demo`


async def test_the_demo_runs_the_seed_flows_on_its_loopback_upstream_answering_and_retrying_as_a_person(
    env: Env,
) -> None:
    out = io.StringIO()
    runs = await run_demo(CommonSettings(), env.demo_key, api_url=env.stack["api"].url,
                          ingest_url=env.stack["ingest"].url, upstream_port=env.demo_port, out=out)  # fmt: skip

    by_flow: dict[str, list[dict[str, Any]]] = {}
    for run in runs.values():
        by_flow.setdefault(run["flow_id"], []).append(run)
    [sync, retry] = sorted(by_flow[demo_flows.ORDER_SYNC], key=lambda r: r["created_at"])
    assert sync["status"] == "PARTIAL" and sync["records"]["written"] == 4 and sync["records"]["failed"] == 1
    assert retry["status"] == "SUCCEEDED" and retry["retry_of"] == sync["id"]
    assert retry["records"]["read"] == 1 and retry["records"]["written"] == 1
    [api_test] = by_flow[demo_flows.API_TEST]
    assert api_test["status"] == "SUCCEEDED" and all(a["passed"] for s in api_test["steps"] for a in s["assertions"])
    [approval] = by_flow[demo_flows.APPROVAL]
    assert approval["status"] == "SUCCEEDED"
    assert {s["name"]: s for s in approval["steps"]}["approve"]["output"] == ANSWER
    assert {r["status"] for r in by_flow["demo-order-sync"]} == {"SUCCEEDED"}
    assert {r["status"] for r in by_flow["demo-invoice-push"]} == {"FAILED"}  # on purpose
    shown = out.getvalue()
    assert "answered" in shown and "retried it as " + retry["id"] in shown and "/api/public/data/order" in shown
    demo = await env.api("GET", "/api/public/data/order", env.demo_key)
    assert demo.status_code == 200 and demo.json()["count"] == 5  # the four synced at first, the fixed one after
