"""The demo's three seed flows (deploy/launcher/demo_flows.py) end to end on real processes and the real broker, with
loopback upstreams.

- "Shopify → NetSuite Orders": a cursor-windowed order sync with one order NetSuite refuses,
  ending PARTIAL with that order's error; the retry of the PARTIAL run sends only that order again.
- "Create user then fetch it": an API test flow with assertions and an extracted variable.
- "Ship order on approval": paused on human_input, resumed with its request id.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from deploy.launcher import demo_flows
from deploy.launcher.demo import ANSWER, run_demo
from deploy.launcher.demo_flows import API_TEST, APPROVAL, ORDER_SYNC, WEBHOOK
from deploy.launcher.demo_upstream import NETSUITE_SALES_ORDERS, SHOP_ORDERS, DemoUpstream, shop_order
from schemas.flows import FlowDefinition
from services.common.settings import CommonSettings
from tests.conftest import Infra
from tests.e2e.stack import free_port
from tests.harness import Env, Upstream, running, stub_upstream

TENANT = "acme"


# ---------------------------------------------------------------- loopback upstreams


@dataclass
class Systems(DemoUpstream):
    """`flowtrail demo`'s Shopify, NetSuite, users API and warehouse, but for a users API that can answer a stale
    email, as after a bad cache deploy."""

    misbehave: bool = False

    def add(self, order: dict[str, Any]) -> None:
        self.orders[order["id"]] = order

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(request.match_info["id"])
        if user is not None and self.misbehave:
            return web.json_response({**user, "email": "ada@old.example"})
        return await super()._get_user(request)


SYSTEMS = Systems()


def shop_requests(up: Upstream) -> list[dict[str, str]]:
    """The query of every order list request Shopify got."""
    return [dict(c.query) for c in up.seen(SHOP_ORDERS + ".json")]


def netsuite_received(up: Upstream) -> list[dict[str, Any]]:
    """Every sales order body NetSuite got, in order."""
    return [c.json() for c in up.seen(NETSUITE_SALES_ORDERS)]


# ---------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def demo_port() -> int:
    """A free port for `flowtrail demo`'s own upstream."""
    return free_port()


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory, demo_port: int) -> AsyncIterator[Env]:
    # The demo's seed flows (what `flowtrail up` publishes) for this test's tenant and upstream; the scheduler stays
    # off so that only the test's triggers run them.
    async with stub_upstream({}, SYSTEMS.app()) as up, running(
        infra, tmp_path_factory, keys={"acme": TENANT, "demo": demo_flows.DEMO_TENANT}, upstream=up,
        flows=[FlowDefinition.model_validate(f) for f in demo_flows.seed_flows(TENANT, up.url)],
        env={"FLOWTRAIL_INGEST_SCHEDULER": "false"},
    ) as env:  # fmt: skip
        # `flowtrail demo`'s flows, pointed at this stack and at a free port for the demo's own upstream.
        await env.publish(demo_flows.demo_flows(ingest=env.url("ingest"), api=env.url("api"),
                                                upstream=f"http://127.0.0.1:{demo_port}"))  # fmt: skip
        yield env


# ---------------------------------------------------------------- a) Shopify → NetSuite Orders


async def test_an_order_sync_with_one_refused_order_ends_partial_and_its_retry_sends_only_that_order(env: Env) -> None:
    shop = SYSTEMS
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    for i, number in enumerate(range(1001, 1006)):
        shop.add(shop_order(number, an_hour_ago + timedelta(minutes=i), email=None if number == 1003 else "a@b.c"))
    bad_id = str(shop.orders[450789469 + 1003]["id"])

    first = await env.wait_status(await env.trigger(ORDER_SYNC))

    assert first["status"] == "PARTIAL", first
    assert first["records"] == {"read": 5, "transformed": 5, "written": 4, "deduped": 0, "skipped": 0, "failed": 1}
    assert "1 record(s) failed" in (first["error_message"] or "")
    window = first["cursor_window"]
    assert window["updated_since"] is None and window["updated_until"] is not None  # the first run reads everything
    # Every page was read with the run's window, the source's own params kept.
    assert [r.get("page_info") for r in shop_requests(env.upstream)] == [None, "2", "4"]
    until = datetime.fromisoformat(window["updated_until"])
    assert all(
        datetime.fromisoformat(r["updated_at_max"]) == until and r["status"] == "any"
        for r in shop_requests(env.upstream)
    )
    assert all("updated_at_min" not in r for r in shop_requests(env.upstream))
    breakdown = first["duration_breakdown"]  # the sync's time split into read, transform and write
    assert breakdown["read_ms"] > 0 and breakdown["write_ms"] > 0
    assert breakdown["read_ms"] + breakdown["transform_ms"] + breakdown["write_ms"] <= breakdown["total_ms"]

    errors = (await env.api("GET", f"/v1/runs/{first['id']}/record-errors")).json()["data"]
    assert len(errors) == 1
    [error] = errors
    assert error["step"] == "sync_orders" and error["record_key"] == bad_id and error["field_path"] == "email"
    assert "Please enter value(s) for: Customer Email" in error["error"]
    assert error["raw_error"]["status"] == 400
    assert error["raw_error"]["body"]["o:errorDetails"][0]["o:errorCode"] == "USER_ERROR"

    # The four written orders are canonical records, known by their Shopify and NetSuite ids.
    data = (await env.api("GET", "/api/public/data/order", params={"limit": 50})).json()
    assert data["entity"] == "order" and data["count"] == 4 and data["next_cursor"] is None
    by_number = {r["order_number"]: r for r in data["data"]}
    assert set(by_number) == {"1001", "1002", "1004", "1005"}
    netsuite_id = SYSTEMS.sales_orders[f"{first['id']}:sync_orders:{450789469 + 1001}"]
    assert by_number["1001"]["external_ids"] == {"shopify": str(450789469 + 1001), "netsuite": netsuite_id}
    assert by_number["1001"]["total"] == 100.1 and by_number["1001"]["status"] == "paid"
    one = await env.api("GET", f"/api/public/data/order/{by_number['1002']['canonical_id']}")
    assert one.status_code == 200 and one.json()["order_number"] == "1002"

    # The next run reads from where the first one's window ended: only the order placed since.
    shop.add(shop_order(1006, datetime.now(UTC), "ada@example.com"))
    second = await env.wait_status(await env.trigger(ORDER_SYNC))
    assert second["status"] == "SUCCEEDED", second
    assert second["cursor_window"]["updated_since"] == window["updated_until"]
    assert second["records"]["read"] == 1 and second["records"]["written"] == 1
    assert datetime.fromisoformat(shop_requests(env.upstream)[-1]["updated_at_min"]) == until

    # Someone adds the customer's email in Shopify (which moves the order's updated_at on), then retries the
    # PARTIAL run: only the refused order goes to NetSuite again.
    shop.orders[int(bad_id)] = {**shop.orders[int(bad_id)], "email": "grace@example.com",
                                "updated_at": datetime.now(UTC).isoformat()}  # fmt: skip
    sent_before = len(netsuite_received(env.upstream))
    r = await env.api("POST", f"/v1/runs/{first['id']}/retry", json={"strategy": "FROM_FAILED_STEP"})
    assert r.status_code == 202, r.text
    retried = await env.wait_status(r.json()["run_id"])

    assert retried["status"] == "SUCCEEDED", retried
    assert retried["retry_of"] == first["id"]
    assert retried["records"] == {"read": 1, "transformed": 1, "written": 1, "deduped": 0, "skipped": 0, "failed": 0}
    assert [body["order_number"] for body in netsuite_received(env.upstream)[sent_before:]] == ["1003"]
    assert netsuite_received(env.upstream)[-1]["email"] == "grace@example.com"
    assert (await env.api("GET", f"/v1/runs/{retried['id']}/record-errors")).json()["data"] == []
    data = (await env.api("GET", "/api/public/data/order", params={"limit": 50})).json()
    assert {r["order_number"] for r in data["data"]} == {"1001", "1002", "1003", "1004", "1005", "1006"}

    # A retry replays its original's window; the run after it still starts where the newest window ended.
    third = await env.wait_status(await env.trigger(ORDER_SYNC))
    assert third["status"] == "SUCCEEDED", third
    assert third["cursor_window"]["updated_since"] == second["cursor_window"]["updated_until"]


# ---------------------------------------------------------------- b) an API test flow


async def test_an_api_test_flow_passes_then_fails_with_the_assertion_expected_and_actual(env: Env) -> None:
    SYSTEMS.misbehave = False
    passed = await env.wait_status(await env.trigger(API_TEST, {}))

    assert passed["status"] == "SUCCEEDED", passed
    create, fetch = passed["steps"]
    user_id = create["extractions"]["user_id"]
    assert user_id.startswith("usr_") and create["output"]["status"] == 201
    assert [(a["expression"], a["passed"]) for a in create["assertions"]] == [("status", True), ("body.id", True)]
    assert create["output"]["request"]["method"] == "POST"
    assert fetch["input"]["url"].endswith(f"/api/users/{user_id}")  # `{{ vars.user_id }}` rendered
    assert fetch["output"]["body"]["email"] == "ada@example.com" and all(a["passed"] for a in fetch["assertions"])

    SYSTEMS.misbehave = True
    failed = await env.wait_status(await env.trigger(API_TEST, {}))

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
    listed = await env.api("GET", "/v1/runs", params={"flow_id": API_TEST, "status": "FAILED"})
    assert [r["id"] for r in listed.json()["data"]] == [failed["id"]]


# ---------------------------------------------------------------- c) approval on human_input


async def test_an_approval_pauses_until_resumed_with_its_request_id_then_ships(env: Env) -> None:
    SYSTEMS.add(shop_order(2001, datetime.now(UTC) - timedelta(days=1), "ada@example.com"))
    run_id = await env.trigger(APPROVAL, {"order": 2001})

    paused = await env.wait_status(run_id, {"PAUSED"})
    waiting = paused["waiting_for"]
    assert waiting["step"] == "approve"
    assert waiting["prompt"] == {"question": "Ship order #2001 (200.10 USD)?", "fields": ["approved", "carrier"]}
    assert waiting["expires_at"] is not None
    assert SYSTEMS.shipments == []  # nothing shipped while waiting

    wrong = await env.api("POST", f"/v1/runs/{run_id}/resume/req_not_this_one", json={"approved": True})
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "conflict"
    assert waiting["request_id"] in wrong.json()["error"]["message"]
    answer = {"approved": True, "carrier": "DHL", "by": "ops@acme.example"}
    r = await env.api("POST", f"/v1/runs/{run_id}/resume/{waiting['request_id']}", json=answer)
    assert r.status_code == 202, r.text

    run = await env.wait_status(run_id)
    assert run["status"] == "SUCCEEDED", run
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["approve"]["output"] == answer
    assert steps["ship"]["status"] == "SUCCEEDED" and steps["ship"]["output"]["status"] == 201
    assert SYSTEMS.shipments == [{"order": "#2001", "carrier": "DHL"}]
    late = await env.api("POST", f"/v1/runs/{run_id}/resume/{waiting['request_id']}", json=answer)
    assert late.status_code == 409  # answered once; the run has moved on


# ---------------------------------------------------------------- `flowtrail demo`


async def test_the_demo_runs_the_seed_flows_on_its_loopback_upstream_answering_and_retrying_as_a_person(
    env: Env, demo_port: int
) -> None:
    out = io.StringIO()
    runs = await run_demo(CommonSettings(), env.keys["demo"], api_url=env.url("api"), ingest_url=env.url("ingest"),
                          upstream_port=demo_port, out=out)  # fmt: skip

    by_flow: dict[str, list[dict[str, Any]]] = {}
    for run in runs.values():
        by_flow.setdefault(run["flow_id"], []).append(run)
    [sync, retry] = sorted(by_flow[ORDER_SYNC], key=lambda r: r["created_at"])
    assert sync["status"] == "PARTIAL" and sync["records"]["written"] == 4 and sync["records"]["failed"] == 1
    assert retry["status"] == "SUCCEEDED" and retry["retry_of"] == sync["id"]
    assert retry["records"]["read"] == 1 and retry["records"]["written"] == 1
    [api_test] = by_flow[API_TEST]
    assert api_test["status"] == "SUCCEEDED" and all(a["passed"] for s in api_test["steps"] for a in s["assertions"])
    [approval] = by_flow[APPROVAL]
    assert approval["status"] == "SUCCEEDED"
    assert {s["name"]: s for s in approval["steps"]}["approve"]["output"] == ANSWER
    assert {r["status"] for r in by_flow["demo-order-sync"]} == {"SUCCEEDED"}
    assert {r["status"] for r in by_flow["demo-invoice-push"]} == {"FAILED"}  # on purpose
    [hooked] = by_flow[WEBHOOK]  # delivered twice, one run
    assert hooked["status"] == "SUCCEEDED" and hooked["trigger_type"] == "webhook", hooked
    assert hooked["steps"][0]["output"] == {"order": "#1050", "email": "jon@example.com"}
    shown = out.getvalue()
    assert "answered" in shown and "retried it as " + retry["id"] in shown and "/api/public/data/order" in shown
    first_failed = next(run for run in runs.values() if run["status"] == "FAILED")  # an invoice push, refused
    assert f"diagnosis of {first_failed['id']}: root cause auth_or_config; next: " in shown, shown
    demo = await env.api("GET", "/api/public/data/order", "demo")
    assert demo.status_code == 200 and demo.json()["count"] == 5  # the four synced at first, the fixed one after
