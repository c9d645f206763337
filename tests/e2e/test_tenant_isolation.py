"""Tenants never see or touch each other's data, through any endpoint (invariant 7), on real processes.

Tenant A owns one of everything (flows, runs of every kind, a webhook subscription with a delivery, an alert
rule with an alert, API keys, connectors, canonical records); tenant B owns a few of its own, some named
like A's (the flow `shared`, the connector `erp`). B's key then tries A's ids on every route of the API's
and ingest's OpenAPI that takes a path parameter, in lists, filters, bulk bodies, cursors and live streams.
Every name, URL and output of A's carries `A-PRIVATE`, so a leak shows in any answer as that text or as one
of A's random ids.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import Infra
from tests.harness import (
    TERMINAL,
    Env,
    KeySpec,
    Upstream,
    answer,
    auth,
    running,
    stub_upstream,
    wait_until,
    whole_sync,
)

pytestmark = pytest.mark.e2e

A, B = "tenant-a", "tenant-b"
PRIVATE = "A-PRIVATE"
RUN_EVENTS = ["run.started", "run.succeeded", "run.partial", "run.failed"]
# Flows only tenant A has, all PRODUCTION; `shared` exists in both tenants and is A's only at version 2.
A_FLOWS = ["a-fails", "a-approval", "a-sync", "a-uses-erp", "a-barrier"]


# ---------------------------------------------------------------- the upstream systems both tenants call


ERP_IDS = itertools.count(1)


async def _erp(request: web.Request) -> web.Response:
    if (await request.json())["total"] < 0:
        return web.json_response({"error": {"message": f"{PRIVATE} refused: total must be positive"}}, status=422)
    return web.json_response({"id": f"erp-{next(ERP_IDS)}"}, status=201)


# A shop, an ERP, a failing endpoint and webhook/alert receivers on loopback (the stub records what it was sent).
ROUTES = {
    ("GET", f"/{PRIVATE}-shop/orders"): answer({"orders": [{"id": 1, "total": 10}, {"id": 2, "total": 20},
                                                           {"id": 3, "total": -1}]}),
    ("POST", f"/{PRIVATE}-erp/orders"): _erp,
    ("POST", f"/{PRIVATE}-fail"): answer({"error": f"{PRIVATE} warehouse offline"}, 422),
    ("POST", "/hooks/{name}"): answer({"ok": True}),
    ("POST", "/alerts/{name}"): answer({"ok": True}),
}  # fmt: skip


def received(up: Upstream, path: str) -> list[Any]:
    """The bodies the receiver was sent at `path`."""
    return [c.json() for c in up.seen(path)]


# ---------------------------------------------------------------- what each tenant owns


@dataclass
class OwnedByA:
    runs: dict[str, str] = field(default_factory=dict)  # succeeded, failed, paused, partial, archived
    test_run: str = ""  # a TESTING run
    request_id: str = ""  # what the paused run waits for
    key_ids: dict[str, str] = field(default_factory=dict)  # admin, spare, testing
    spare_key: str = ""
    subscription_id: str = ""
    delivery_id: str = ""
    rule_id: str = ""
    alert_id: str = ""
    connector_ids: list[str] = field(default_factory=list)
    canonical_ids: list[str] = field(default_factory=list)
    fingerprint: str = ""
    bulk_operation_id: str = ""
    secret_name: str = ""  # a name is no secret (B may hold one of its own by that name); its value is

    def secrets(self) -> set[str]:
        """Text that may appear in no answer to B: A's random ids and the mark on A's names and outputs."""
        ids = [*self.runs.values(), self.test_run, self.request_id, *self.key_ids.values(), self.subscription_id,
               self.delivery_id, self.rule_id, self.alert_id, *self.connector_ids, *self.canonical_ids,
               self.fingerprint, self.bulk_operation_id]  # fmt: skip
        assert all(ids), f"fixture left an id of A's empty: {ids}"
        return {PRIVATE, *ids}


@dataclass
class OwnedByB:
    key_id: str = ""
    shared_runs: list[str] = field(default_factory=list)
    parent_run: str = ""  # a subflow naming A's flow a-approval
    subscription_id: str = ""
    rule_id: str = ""  # a failed_run rule naming A's flow a-fails
    connector_id: str = ""  # named `erp`, like A's


@dataclass
class World:
    env: Env
    a: OwnedByA
    b: OwnedByB

    @property
    def key_a(self) -> str:
        return self.env.keys["a"]

    @property
    def key_a_test(self) -> str:
        return self.env.keys["a_test"]

    @property
    def key_b(self) -> str:
        return self.env.keys["b"]

    @property
    def receiver(self) -> Upstream:
        return self.env.upstream

    async def call(self, method: str, path: str, key: str, **kw: Any) -> httpx.Response:
        return await self.env.api(method, path, key, **kw)

    async def ok(self, method: str, path: str, key: str, status: int = 200, **kw: Any) -> Any:
        return await self.env.ok(method, path, key, status, **kw)

    async def run(self, run_id: str, key: str, statuses: set[str] | None = None) -> dict[str, Any]:
        return await self.env.wait_status(run_id, statuses or TERMINAL, 45, key)

    def leaks(self, text: str, allowed: tuple[str, ...] = ()) -> list[str]:
        return sorted(s for s in self.a.secrets() if s in text and s not in allowed)


# ---------------------------------------------------------------- the fixture


def _transform(output: Any) -> list[dict[str, Any]]:
    return [{"name": "shape", "action": "transform", "input": {"output": output}}]


def _flows_of_a(upstream: str) -> list[dict[str, Any]]:
    tags = ["a-private-tag"]
    return [
        {"id": "shared", "name": f"{PRIVATE} shared", "tags": tags, "steps": _transform({"who": f"{PRIVATE}-v1"})},
        {"id": "a-fails", "name": f"{PRIVATE} fails", "tags": tags, "steps": [
            {"name": "call_a", "action": "http_request", "retry": {"delays_s": []},
             "input": {"method": "POST", "url": f"{upstream}/{PRIVATE}-fail", "body": {}}}]},
        {"id": "a-approval", "name": f"{PRIVATE} approval", "tags": tags, "steps": [
            {"name": "approve", "action": "human_input", "input": {"question": f"{PRIVATE} ship it?"}}]},
        {"id": "a-sync", "name": f"{PRIVATE} sync", "tags": tags, "steps": [
            whole_sync("sync_orders", f"{upstream}/{PRIVATE}-shop/orders", "orders", f"{upstream}/{PRIVATE}-erp/orders",
                       {"total": "total"}, entity="order", system="shop", dest_system="erp")]},
        {"id": "a-uses-erp", "name": f"{PRIVATE} uses erp", "tags": tags, "steps": [
            {"name": "call_erp", "action": "http_request", "input": {"connector": "erp", "path": "/orders"}}]},
        {"id": "a-barrier", "name": f"{PRIVATE} barrier", "tags": tags, "steps": _transform({"barrier": True})},
    ]  # fmt: skip


async def _publish(w: World, key: str, body: dict[str, Any], path: str = "/v1/flows") -> None:
    r = await w.call("POST", path, key, json=body)
    assert r.status_code in (201, 202), r.text  # 202: written, the projector had not caught up yet


async def _projected(w: World, key: str, flow_id: str, version: int) -> None:
    async def shown() -> bool:
        r = await w.call("GET", f"/v1/flows/{flow_id}", key)
        return r.status_code == 200 and r.json()["latest_version"] == version

    await wait_until(shown, 45, f"flow {flow_id} v{version} projected", every=0.2)


async def _flows(w: World) -> None:
    for body in _flows_of_a(w.receiver.url):
        await _publish(w, w.key_a, body)
    await _publish(w, w.key_a, {"name": f"{PRIVATE} shared", "steps": _transform({"who": f"{PRIVATE}-v2"})},
                   "/v1/flows/shared/versions")  # fmt: skip
    await _publish(w, w.key_a_test, {"id": "a-probe", "name": f"{PRIVATE} probe", "steps": _transform({"t": 1})})
    await _publish(w, w.key_b, {"id": "shared", "name": "B shared", "steps": _transform({"who": "b"})})
    await _publish(w, w.key_b, {"id": "b-parent", "name": "B parent", "steps": [
        {"name": "spawn", "action": "subflow", "input": {"flow_id": "a-approval", "input": {}}}]})  # fmt: skip
    await asyncio.gather(
        *(_projected(w, w.key_a, f, 1) for f in A_FLOWS),
        _projected(w, w.key_a, "shared", 2),
        _projected(w, w.key_a_test, "a-probe", 1),
        _projected(w, w.key_b, "shared", 1),
        _projected(w, w.key_b, "b-parent", 1),
    )


async def _control_plane(w: World) -> None:
    """Subscriptions, alert rules and connectors, before any run, so they see every run finish."""
    url = w.receiver.url
    sub = await w.ok("POST", "/v1/webhooks", w.key_a, 201, json={"url": f"{url}/hooks/{PRIVATE}", "events": RUN_EVENTS})
    w.a.subscription_id = sub["id"]
    sub = await w.ok("POST", "/v1/webhooks", w.key_b, 201, json={"url": f"{url}/hooks/b", "events": RUN_EVENTS})
    w.b.subscription_id = sub["id"]
    rule = await w.ok("POST", "/v1/alert-rules", w.key_a, 201, json={
        "name": f"{PRIVATE} rule", "flow_id": "a-fails", "kind": "failed_run",
        "channels": [{"type": "webhook", "url": f"{url}/alerts/{PRIVATE}"}]})  # fmt: skip
    w.a.rule_id = rule["id"]
    # B's rule names A's flow id: it must judge B's runs of a flow called a-fails (there are none), never A's.
    rule = await w.ok("POST", "/v1/alert-rules", w.key_b, 201, json={
        "name": "B watches a-fails", "flow_id": "a-fails", "kind": "failed_run",
        "channels": [{"type": "webhook", "url": f"{url}/alerts/b"}]})  # fmt: skip
    w.b.rule_id = rule["id"]
    for name in ("erp", "crm"):
        config = {"url": f"{url}/{PRIVATE}-{name}", "headers": {"X-Token": f"{PRIVATE}-tok"}}
        con = await w.ok("POST", "/v1/connectors", w.key_a, 201, json={"name": name, "kind": "http", "config": config})
        w.a.connector_ids.append(con["id"])
    con = await w.ok("POST", "/v1/connectors", w.key_b, 201,
                     json={"name": "erp", "kind": "http", "config": {"url": f"{url}/b-erp"}})  # fmt: skip
    w.b.connector_id = con["id"]
    w.a.secret_name = "A_SHOP_TOKEN"
    await w.ok("PUT", f"/v1/secrets/{w.a.secret_name}", w.key_a, 201, json={"value": f"{PRIVATE}-secret-value"})


async def _runs(w: World) -> None:
    a = w.a
    ids = {
        "succeeded": await w.env.trigger("shared", key=w.key_a),
        "failed": await w.env.trigger("a-fails", key=w.key_a),
        "paused": await w.env.trigger("a-approval", key=w.key_a),
        "partial": await w.env.trigger("a-sync", key=w.key_a),
        "archived": await w.env.trigger("shared", key=w.key_a),
    }
    a.test_run = await w.env.trigger("a-probe", key=w.key_a_test)
    w.b.shared_runs.append(await w.env.trigger("shared", key=w.key_b))
    w.b.parent_run = await w.env.trigger("b-parent", key=w.key_b)
    expected = {"succeeded": "SUCCEEDED", "failed": "FAILED", "paused": "PAUSED", "partial": "PARTIAL",
                "archived": "SUCCEEDED"}  # fmt: skip
    runs = await asyncio.gather(*(w.run(ids[role], w.key_a, {status}) for role, status in expected.items()))
    a.runs = ids
    a.request_id = runs[2]["waiting_for"]["request_id"]
    a.fingerprint = runs[1]["error_fingerprint"]
    assert a.fingerprint and runs[3]["records"]["failed"] == 1
    await asyncio.gather(w.run(a.test_run, w.key_a_test, {"SUCCEEDED"}), w.run(w.b.shared_runs[0], w.key_b),
                         w.run(w.b.parent_run, w.key_b))  # fmt: skip
    bulk = await w.ok("POST", "/v1/runs/bulk/archive", w.key_a, 202, json={"ids": [ids["archived"]]})
    a.bulk_operation_id = bulk["bulk_operation_id"]
    await w.run(ids["archived"], w.key_a, {"SUCCEEDED"})

    async def archived() -> bool:
        return bool((await w.ok("GET", f"/v1/runs/{ids['archived']}", w.key_a))["archived"])

    await wait_until(archived, 45, "A's bulk archive", every=0.2)


async def _derived(w: World) -> None:
    """What the projector derives from A's runs: a webhook delivery, an alert, canonical records."""
    a = w.a

    async def delivered() -> str | None:
        rows = (await w.ok("GET", f"/v1/webhooks/{a.subscription_id}/deliveries", w.key_a))["data"]
        return next((d["id"] for d in rows if d["status"] == "delivered"), None)

    async def alert() -> str | None:
        rows = (await w.ok("GET", "/v1/alerts", w.key_a))["data"]
        if not rows:
            return None
        detail = await w.ok("GET", f"/v1/alerts/{rows[0]['id']}", w.key_a)
        return detail["id"] if all(d["status"] == "delivered" for d in detail["deliveries"]) else None

    async def records() -> list[str] | None:
        rows = (await w.ok("GET", "/api/public/data/order", w.key_a))["data"]
        return [r["canonical_id"] for r in rows] if len(rows) == 2 else None

    async def b_delivered() -> bool:
        rows = (await w.ok("GET", f"/v1/webhooks/{w.b.subscription_id}/deliveries", w.key_b))["data"]
        return any(d["status"] == "delivered" and d["event"] == "run.succeeded" for d in rows)

    a.delivery_id, a.alert_id, a.canonical_ids, _ = await asyncio.gather(
        wait_until(delivered, 45, "A's webhook delivery", every=0.2),
        wait_until(alert, 45, "A's alert", every=0.2),
        wait_until(records, 45, "A's canonical records", every=0.2),
        wait_until(b_delivered, 45, "B's own webhook delivery", every=0.2),
    )  # fmt: skip


@pytest.fixture(scope="module")
async def world(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    keys = {
        "a": KeySpec(A, name=f"{PRIVATE} admin"),
        "spare": KeySpec(A, name=f"{PRIVATE} spare"),
        "a_test": KeySpec(A, environment="TESTING"),
        "b": KeySpec(B, name="B admin"),
    }
    loopback = {
        "FLOWTRAIL_API_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
        "FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true",
        "FLOWTRAIL_PROJECTOR_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    }
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, keys=keys, env=loopback, upstream=up
    ) as env:  # fmt: skip
        a = OwnedByA(spare_key=env.keys["spare"])
        a.key_ids = {"admin": env.key_ids["a"], "spare": env.key_ids["spare"], "testing": env.key_ids["a_test"]}
        w = World(env, a, OwnedByB(key_id=env.key_ids["b"]))
        await _flows(w)
        await _control_plane(w)
        await _runs(w)
        await _derived(w)
        yield w


# ---------------------------------------------------------------- A's objects as A sees them


async def a_view(w: World, ignore_runs: Collection[str] = ()) -> dict[str, Any]:
    """Everything B could have changed, as A's key shows it; equal before and after means untouched."""
    a, key = w.a, w.key_a
    view: dict[str, Any] = {}
    for role, run_id in a.runs.items():
        run = await w.ok("GET", f"/v1/runs/{run_id}", key)
        events = await w.ok("GET", f"/v1/runs/{run_id}/events", key)
        view[f"run {role}"] = {k: run[k] for k in ("status", "archived", "updated_at", "bulk_operation_id")}
        view[f"run {role}"]["events"] = [e["type"] for e in events["data"]]
    listed = await w.ok("GET", "/v1/runs", key, params={"include_archived": "true", "limit": 100})
    view["run ids"] = sorted(r["id"] for r in listed["data"] if r["id"] not in ignore_runs)
    for flow_id in [*A_FLOWS, "shared"]:
        flow = await w.ok("GET", f"/v1/flows/{flow_id}", key)
        view[f"flow {flow_id}"] = {k: flow[k] for k in ("status", "latest_version", "versions", "definition")}
    view["webhooks"] = (await w.ok("GET", "/v1/webhooks", key))["data"]
    deliveries = (await w.ok("GET", f"/v1/webhooks/{a.subscription_id}/deliveries", key))["data"]
    view["delivery"] = [{k: d[k] for k in ("status", "attempts", "delivered_at")} for d in deliveries
                        if d["id"] == a.delivery_id]  # fmt: skip
    rule = await w.ok("GET", f"/v1/alert-rules/{a.rule_id}", key)
    view["rule"] = {k: v for k, v in rule.items() if k != "state"} | {"open": rule["state"]["open"]}
    alert = await w.ok("GET", f"/v1/alerts/{a.alert_id}", key)
    sent = [{k: d[k] for k in ("id", "status", "attempts")} for d in alert["deliveries"]]
    view["alert"] = {"status": alert["status"], "resolved_at": alert["resolved_at"], "deliveries": sent}
    keys = (await w.ok("GET", "/v1/api-keys", key))["data"]
    view["keys"] = sorted((k["id"], k["status"], k["revoked_at"], k["rotated_at"], k["expires_at"]) for k in keys)
    view["spare key answers"] = (await w.call("GET", "/v1/flows", a.spare_key, params={"limit": 1})).status_code
    for connector_id in a.connector_ids:
        con = await w.ok("GET", f"/v1/connectors/{connector_id}", key)
        view[f"connector {connector_id}"] = {k: con[k] for k in ("name", "config", "last_verified_at", "updated_at")}
    for canonical_id in a.canonical_ids:
        view[f"record {canonical_id}"] = await w.ok("GET", f"/api/public/data/order/{canonical_id}", key)
    view["secret"] = await w.ok("GET", f"/v1/secrets/{a.secret_name}", key)
    return view


async def barrier(w: World) -> set[str]:
    """A run of A's that went through triggers and commands after B's requests: what B's requests would have
    caused (they were answered before it started) has been processed by then."""
    run_id = await w.env.trigger("a-barrier", key=w.key_a)
    await w.run(run_id, w.key_a, {"SUCCEEDED"})
    await w.ok("POST", f"/v1/runs/{run_id}/archive", w.key_a, 202)

    async def archived() -> bool:
        return bool((await w.ok("GET", f"/v1/runs/{run_id}", w.key_a))["archived"])

    await wait_until(archived, 45, "barrier run archived", every=0.2)
    return {run_id}


# ---------------------------------------------------------------- 1. every route with a path parameter

# Each path parameter, filled with A's ids. A route with a parameter missing here fails the sweep: add it.
PATH_VALUES: dict[str, Callable[[World], list[str]]] = {
    "run_id": lambda w: list(w.a.runs.values()),
    "request_id": lambda w: [w.a.request_id],
    "flow_id": lambda w: A_FLOWS,
    "action_name": lambda w: A_FLOWS,
    "version": lambda w: ["1"],
    "subscription_id": lambda w: [w.a.subscription_id],
    "delivery_id": lambda w: [w.a.delivery_id],
    "key_id": lambda w: list(w.a.key_ids.values()),
    "rule_id": lambda w: [w.a.rule_id],
    "alert_id": lambda w: [w.a.alert_id],
    "connector_id": lambda w: w.a.connector_ids,
    "entity": lambda w: ["order"],
    "canonical_id": lambda w: w.a.canonical_ids,
    "name": lambda w: [w.a.secret_name],
    "tenant_id": lambda w: [A],
}

# A valid body for each route that takes one, so a refusal can only come from whose id it is.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/runs/{run_id}/retry"): {"strategy": "ON_LATEST_VERSION"},
    ("POST", "/v1/runs/{run_id}/cancel"): {"reason": "B was here"},
    ("POST", "/v1/runs/{run_id}/resume/{request_id}"): {"approved": True},
    ("POST", "/v1/api-keys/{key_id}/rotate"): {"grace_period_s": 0},
    ("POST", "/v1/flows/{flow_id}/versions"): {"name": "B's takeover", "steps": _transform({"who": "b"})},
    ("POST", "/v1/flows/{flow_id}/pause"): {"reason": "B was here"},
    ("PATCH", "/v1/alert-rules/{rule_id}"): {"enabled": False, "name": "B was here"},
    ("POST", "/v1/flows/{flow_id}/trigger"): {"input": {"who": "b"}},
    ("POST", "/v1/actions/{action_name}/async"): {"input": {"who": "b"}},
    ("POST", "/v1/actions/{action_name}/live"): {"input": {"who": "b"}},
    ("POST", "/v1/runs/{run_id}/resume"): {"input": {"approved": True}},
    ("POST", "/v1/schedules/{flow_id}/pause"): {"reason": "B was here"},
    ("PUT", "/v1/secrets/{name}"): {"value": "B's own value"},
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): {"retention": {"metadata_days": 1, "payload_days": 1}},
}

# Routes that name a resource in the caller's own namespace: B writing one by A's name makes B's own (A's is untouched,
# as a_view checks), so B's answer is this status, not 404.
OWN_NAMESPACE: dict[tuple[str, str], int] = {("PUT", "/v1/secrets/{name}"): 201}

# The operator routes (docs/tenants.md) take the deployment's operator key only: every tenant's key, A's too, is 403
# (`operator_api_disabled` where the deployment has no operator key, as here).
OPERATOR_ONLY = "/v1/admin/"
OPERATOR_REFUSALS = ("forbidden", "operator_api_disabled")


async def _b_runs_of(w: World, flow_id: str) -> int:
    """B's own runs of a flow id (B's subflow named A's flow a-approval: that child run is B's)."""
    runs = await w.ok("GET", "/v1/runs", w.key_b, params={"flow_id": flow_id, "include_archived": "true", "limit": 100})
    return len(runs["data"])


async def _b_flow_stats(w: World, values: tuple[str, ...], body: Any) -> bool:
    return bool(body["runs"] == await _b_runs_of(w, values[0]) and (body["runs"] or body["series"] == []))


async def _no_records(w: World, values: tuple[str, ...], body: Any) -> bool:
    return bool(body["data"] == [] and body["count"] == 0)


# Routes that answer B 200 with B's own (empty) result rather than 404: they do not look the id up.
EMPTY_ANSWERS: dict[tuple[str, str], Callable[[World, tuple[str, ...], Any], Awaitable[bool]]] = {
    ("GET", "/v1/analytics/flows/{flow_id}"): _b_flow_stats,
    ("GET", "/api/public/data/{entity}"): _no_records,
}


@dataclass(frozen=True)
class Route:
    base: str
    method: str
    path: str
    params: tuple[str, ...]
    has_body: bool


async def routes_with_parameters(w: World) -> list[Route]:
    out = []
    for base in (w.env.url("api"), w.env.url("ingest")):
        spec = (await w.env.http.get(f"{base}/openapi.json")).json()
        for path, operations in spec["paths"].items():
            params = tuple(re.findall(r"{(\w+)}", path))
            for method, op in operations.items():
                if params and method in ("get", "post", "put", "patch", "delete"):
                    out.append(Route(base, method.upper(), path, params, "requestBody" in op))
    return out


async def _answer(w: World, route: Route, path: str, key: str) -> tuple[int, str]:
    """Status and body text; a live stream is read for a second, then left."""
    body = BODIES.get((route.method, route.path))
    async with w.env.http.stream(route.method, route.base + path, headers=auth(key), json=body) as r:
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, (await r.aread()).decode()
        chunks: list[str] = []
        with suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for chunk in r.aiter_text():
                    chunks.append(chunk)
        return r.status_code, "".join(chunks)


async def test_every_route_with_a_path_parameter_answers_b_404_for_a_s_ids_and_changes_nothing(world: World) -> None:
    w = world
    routes = await routes_with_parameters(w)
    unknown = sorted({f"{r.method} {r.path} ({p})" for r in routes for p in r.params if p not in PATH_VALUES})
    assert not unknown, (
        f"routes with a path parameter this test cannot fill with A's ids; extend PATH_VALUES: {unknown}"
    )
    bodiless = sorted(f"{r.method} {r.path}" for r in routes if r.has_body and (r.method, r.path) not in BODIES)
    assert not bodiless, f"routes taking a body this test has none for; extend BODIES: {bodiless}"
    swept = {f"{r.method} {r.path}" for r in routes}
    assert {"POST /v1/flows/{flow_id}/trigger", "POST /v1/runs/{run_id}/resume/{request_id}",
            "DELETE /v1/connectors/{connector_id}", "GET /v1/runs/{run_id}/stream"} <= swept  # fmt: skip

    before = await a_view(w)
    problems: list[str] = []
    calls = 0
    for route in routes:
        for values in itertools.product(*(PATH_VALUES[p](w) for p in route.params)):
            path = route.path.format(**dict(zip(route.params, values, strict=True)))
            status, text = await _answer(w, route, path, w.key_b)
            calls += 1
            where = f"B {route.method} {path} -> {status}"
            if leaked := w.leaks(text, allowed=values):
                problems.append(f"{where} shows A's {leaked}: {text[:300]}")
            empty = EMPTY_ANSWERS.get((route.method, route.path))
            own = OWN_NAMESPACE.get((route.method, route.path))
            if route.path.startswith(OPERATOR_ONLY):
                for who, key in (("B", w.key_b), ("A", w.key_a)):
                    status, text = await _answer(w, route, path, key)
                    if status != 403 or orjson.loads(text)["error"]["code"] not in OPERATOR_REFUSALS:
                        problems.append(f"{who} {route.method} {path} -> {status}, not 403: {text[:300]}")
                continue
            if own is not None:
                if status != own:
                    problems.append(f"{where}, not {own} (B's own {values}): {text[:300]}")
                # Gone again, so B's reads and deletes of that name below concern A's only (and must be 404).
                assert (await w.call("DELETE", path, w.key_b)).status_code == 204
            elif status == 200 and empty is not None:
                if not await empty(w, values, orjson.loads(text)):
                    problems.append(f"{where} is not empty: {text[:300]}")
            elif status != 404 or orjson.loads(text)["error"]["code"] != "not_found":
                problems.append(f"{where}, not 404 not_found: {text[:300]}")
            if route.method == "GET":
                # The same request with A's key finds it: the 404 above is about whose id it is.
                own, text = await _answer(w, route, path, w.key_a)
                if own != 200:
                    problems.append(f"A GET {path} -> {own}, so the id is not a real one of A's: {text[:300]}")
    assert not problems, "\n".join(problems)
    assert calls >= len(routes)

    ignore = await barrier(w)
    assert await a_view(w, ignore) == before


# ---------------------------------------------------------------- 2. lists, filters, bulk bodies, cursors

B_LISTS = [
    "/v1/runs", "/v1/runs?include_archived=true&limit=100", "/v1/flows?limit=100", "/v1/webhooks", "/v1/alert-rules",
    "/v1/alerts", "/v1/api-keys", "/v1/connectors", "/v1/analytics/failure-groups", "/v1/analytics/flakiness",
    "/v1/analytics/endpoints", "/api/public/data/order",
]  # fmt: skip


async def test_b_s_lists_show_none_of_a_s_objects(world: World) -> None:
    w = world
    for path in B_LISTS:
        r = await w.call("GET", path, w.key_b)
        assert r.status_code == 200, f"{path}: {r.text}"
        assert not w.leaks(r.text), f"B GET {path} shows A's {w.leaks(r.text)}: {r.text[:500]}"
        # The same list for A shows A's own (control: the list is not simply empty).
        mine = await w.call("GET", path, w.key_a)
        if path not in ("/v1/analytics/flakiness",):
            assert w.leaks(mine.text), f"A GET {path} shows nothing of A's: {mine.text[:300]}"
    flows = {f["id"] for f in (await w.ok("GET", "/v1/flows", w.key_b, params={"limit": 100}))["data"]}
    assert flows == {"shared", "b-parent"}
    runs = (await w.ok("GET", "/v1/runs", w.key_b, params={"include_archived": "true", "limit": 100}))["data"]
    assert {r["flow_id"] for r in runs} <= {"shared", "b-parent", "a-approval"}  # a-approval: B's own child run
    assert {r["id"] for r in runs}.isdisjoint(w.a.secrets())
    # B's connector `erp` is B's: A's flow naming a connector `erp` is not among the flows using it.
    erp = await w.ok("GET", f"/v1/connectors/{w.b.connector_id}", w.key_b)
    assert erp["flows"] == [] and erp["config"]["url"].endswith("/b-erp")
    mine = await w.ok("GET", f"/v1/connectors/{w.a.connector_ids[0]}", w.key_a)
    assert [f["id"] for f in mine["flows"]] == ["a-uses-erp"]


async def test_b_s_filters_naming_a_s_ids_match_nothing(world: World) -> None:
    w, a = world, world.a
    all_a = ",".join(a.runs.values())
    queries: list[dict[str, Any]] = [
        {"ids": all_a}, *({"ids": run_id} for run_id in a.runs.values()), {"ids": a.test_run},
        {"flow_id": ",".join(A_FLOWS)}, {"flow_id": "a-fails", "status": "FAILED"},
        {"q": a.runs["failed"][-12:]}, {"q": PRIVATE}, {"q": "answered 422"}, {"error_fingerprint": a.fingerprint},
        {"failed_step": "call_a"}, {"caller": a.key_ids["admin"]}, {"tags": "a-private-tag"},
        {"bulk_operation_id": a.bulk_operation_id}, {"status": "FAILED,PARTIAL,PAUSED"},
    ]  # fmt: skip
    for params in queries:
        for archived in ("false", "true"):
            body = await w.ok("GET", "/v1/runs", w.key_b, params={**params, "include_archived": archived})
            text = orjson.dumps(body).decode()
            assert not w.leaks(text, tuple(params.values())), f"B /v1/runs?{params}: {text[:500]}"
            assert all(r["id"] not in a.secrets() for r in body["data"])
        if params != {"ids": a.test_run}:  # A's production key does not see the TESTING run either
            mine = await w.ok("GET", "/v1/runs", w.key_a, params={**params, "include_archived": "true"})
            assert mine["data"], f"control: A's own filter {params} matched nothing"
    others = {
        "/v1/flows": [{"q": PRIVATE}, {"tag": "a-private-tag"}],
        "/v1/alerts": [{"rule_id": a.rule_id}, {"flow_id": "a-fails"}],
        "/v1/analytics/failure-groups": [{"flow_id": "a-fails"}],
        "/v1/analytics/endpoints": [{"flow_id": "a-fails"}],
        "/v1/analytics/flakiness": [{"flow_id": "a-fails"}],
        "/api/public/data/order": [{"updated_since": "2000-01-01T00:00:00Z"}],
        "/v1/connectors": [{"status": "ok"}],
    }
    for path, variants in others.items():
        for params in variants:
            body = await w.ok("GET", path, w.key_b, params=params)
            assert not w.leaks(orjson.dumps(body).decode(), tuple(params.values())), f"B {path}?{params}: {body}"
            if path != "/v1/connectors":  # B's own connector is ok too
                assert body["data"] == [], f"B {path}?{params}: {body}"
    rules = (await w.ok("GET", "/v1/alert-rules", w.key_b, params={"flow_id": "a-fails"}))["data"]
    assert [r["id"] for r in rules] == [w.b.rule_id]  # B's own rule on a flow named a-fails, not A's


async def test_b_s_bulk_actions_with_a_s_ids_or_filters_count_zero_and_change_nothing(world: World) -> None:
    w, a = world, world.a
    before = await a_view(w)
    ids = [*a.runs.values(), a.test_run]
    for action in ("retry", "cancel", "archive"):
        # Not a-approval: B's subflow of that name made a run of B's own.
        a_only = [f for f in A_FLOWS if f != "a-approval"]
        for selection in ({"ids": ids}, {"flow_id": a_only}, {"ids": ids, "exclude_ids": [w.b.parent_run]}):
            for dry_run in (True, False):
                r = await w.call("POST", f"/v1/runs/bulk/{action}", w.key_b, json={**selection, "dry_run": dry_run})
                assert r.status_code == (200 if dry_run else 202), r.text
                answer = r.json()
                assert (answer["matched"], answer["count"], answer["sample"]) == (0, 0, []), (action, selection, answer)
                assert not w.leaks(r.text)
                if action == "retry" and not dry_run:
                    assert answer["new_run_ids"] == []
    # A status filter matches B's own runs only: as many as B's list shows, none of A's in the sample.
    b_failed = (await w.ok("GET", "/v1/runs", w.key_b, params={"status": "FAILED,PARTIAL,PAUSED"}))["data"]
    r = await w.ok("POST", "/v1/runs/bulk/retry", w.key_b, json={"statuses": ["FAILED", "PARTIAL", "PAUSED"],
                                                                    "dry_run": True})  # fmt: skip
    assert r["matched"] == len(b_failed) and not w.leaks(orjson.dumps(r).decode())
    # Control: A's own dry run with a mixed id list matches A's run only.
    mixed = await w.ok("POST", "/v1/runs/bulk/archive", w.key_a, json={"ids": [a.runs["failed"], w.b.parent_run],
                                                                          "dry_run": True})  # fmt: skip
    assert mixed["matched"] == 1 and [s["id"] for s in mixed["sample"]] == [a.runs["failed"]]
    ignore = await barrier(w)
    assert await a_view(w, ignore) == before


async def test_a_s_cursors_used_by_b_page_through_b_s_objects_only(world: World) -> None:
    w = world
    pages: dict[str, dict[str, Any]] = {
        "/v1/runs": {"limit": 1, "include_archived": "true"},
        "/v1/flows": {"limit": 1},
        "/v1/connectors": {"limit": 1},
        "/api/public/data/order": {"limit": 1},
    }
    for path, params in pages.items():
        first = await w.ok("GET", path, w.key_a, params=params)
        cursors = [c for c in (first.get("next_cursor"), first.get("prev_cursor")) if c]
        assert first["next_cursor"], f"control: A's {path} has a second page"
        # Page two for A shows A's; for B the same cursor shows none of A's.
        second = await w.ok("GET", path, w.key_a, params={**params, "cursor": first["next_cursor"]})
        assert w.leaks(orjson.dumps(second["data"]).decode())
        for cursor in cursors:
            for limit in (1, 100):
                body = await w.ok("GET", path, w.key_b, params={**params, "limit": limit, "cursor": cursor})
                assert not w.leaks(orjson.dumps(body).decode()), f"B {path} with A's cursor: {body}"


# ---------------------------------------------------------------- 3. live streams


async def _follow(w: World, path: str, key: str, into: list[dict[str, Any]], connected: asyncio.Event,
                  last_event_id: str | None = None) -> None:  # fmt: skip
    """Collect a server-sent event stream's events (id and decoded data) until cancelled."""
    headers = auth(key) | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    async with w.env.http.stream("GET", w.env.url("api") + path, headers=headers, timeout=None) as r:
        assert r.status_code == 200, (await r.aread()).decode()
        connected.set()
        event: dict[str, str] = {}
        async for line in r.aiter_lines():
            if not line:
                if "data" in event:
                    into.append({"id": event.get("id"), "data": orjson.loads(event["data"])})
                event = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                event[name] = value.removeprefix(" ")


async def _streaming(
    w: World, key: str, last_event_id: str | None = None
) -> tuple[asyncio.Task[None], list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    connected = asyncio.Event()
    task = asyncio.create_task(_follow(w, "/v1/stream", key, seen, connected, last_event_id))
    async with asyncio.timeout(20):
        await connected.wait()  # the stream's start is fixed before its headers are sent
    return task, seen


async def _seen_final(seen: list[dict[str, Any]], run_id: str) -> bool:
    return any(e["data"]["id"] == run_id and e["data"]["status"] in TERMINAL for e in seen)


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with suppress(asyncio.CancelledError):
            await task


async def test_b_s_live_streams_carry_nothing_of_a_s(world: World) -> None:
    w = world
    (a_task, a_seen), (b_task, b_seen) = await _streaming(w, w.key_a), await _streaming(w, w.key_b)
    try:
        a_run, b_run = await w.env.trigger("shared", key=w.key_a), await w.env.trigger("shared", key=w.key_b)
        w.b.shared_runs.append(b_run)
        await wait_until(lambda: _seen_final(a_seen, a_run), 45, "A's run on A's stream", every=0.2)
        await wait_until(lambda: _seen_final(b_seen, b_run), 45, "B's run on B's stream", every=0.2)
    finally:
        await _stop(a_task, b_task)
    shown_to_b = orjson.dumps(b_seen).decode()
    assert a_run not in shown_to_b and not w.leaks(shown_to_b), f"B's stream carried A's runs: {shown_to_b[:500]}"
    assert b_run not in {e["data"]["id"] for e in a_seen}
    # Resuming from an event id of A's stream replays B's runs only.
    task, replayed = await _streaming(w, w.key_b, last_event_id=a_seen[0]["id"])
    try:
        later = await w.env.trigger("shared", key=w.key_b)
        w.b.shared_runs.append(later)
        await wait_until(lambda: _seen_final(replayed, later), 45, "B's run on B's resumed stream", every=0.2)
    finally:
        await _stop(task)
    assert a_run not in {e["data"]["id"] for e in replayed}
    assert not w.leaks(orjson.dumps(replayed).decode())
    # One run's stream: A's paused run is not B's to follow.
    r = await w.call("GET", f"/v1/runs/{w.a.runs['paused']}/stream", w.key_b)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------- 4. the same names in both tenants


async def test_the_same_flow_id_in_two_tenants_is_two_flows(world: World) -> None:
    w = world
    run_id = await w.env.trigger("shared", key=w.key_b)
    w.b.shared_runs.append(run_id)
    run = await w.run(run_id, w.key_b)
    assert run["status"] == "SUCCEEDED" and run["flow_version"] == 1
    assert [(s["name"], s["output"]) for s in run["steps"]] == [("shape", {"who": "b"})]
    assert not w.leaks(orjson.dumps(run).decode())
    flow = await w.ok("GET", "/v1/flows/shared", w.key_b)
    assert flow["name"] == "B shared" and [v["version"] for v in flow["versions"]] == [1]
    r = await w.call("GET", "/v1/flows/shared/versions/2", w.key_b)  # A's version 2
    assert r.status_code == 404
    r = await w.env.ingest("POST", "/v1/flows/shared/trigger", w.key_b, json={"input": {}, "flow_version": 2})
    assert r.status_code == 404
    b_runs = (await w.ok("GET", "/v1/runs", w.key_b, params={"flow_id": "shared", "limit": 100}))["data"]
    assert {r["id"] for r in b_runs} == set(w.b.shared_runs)
    stats = await w.ok("GET", "/v1/analytics/flows/shared", w.key_b)
    assert stats["runs"] == len(w.b.shared_runs)
    a_runs = (await w.ok("GET", "/v1/runs", w.key_a, params={"flow_id": "shared", "limit": 100,
                                                                "include_archived": "true"}))["data"]  # fmt: skip
    assert {r["id"] for r in a_runs}.isdisjoint(w.b.shared_runs) and a_runs
    assert {r["flow_version"] for r in a_runs if r["id"] == w.a.runs["succeeded"]} == {2}


async def test_b_s_rules_webhooks_and_subflows_naming_a_s_flows_reach_nothing_of_a_s(world: World) -> None:
    w = world
    # B's failed_run rule on a flow named a-fails: A's a-fails failed and alerted A, not B.
    assert (await w.ok("GET", "/v1/alerts", w.key_b))["data"] == []
    assert received(w.receiver, "/alerts/b") == []
    assert received(w.receiver, f"/alerts/{PRIVATE}")
    # B's subscription to every run event was sent B's runs only.
    sent_to_b = orjson.dumps(received(w.receiver, "/hooks/b")).decode()
    assert not w.leaks(sent_to_b) and w.b.shared_runs[0] in sent_to_b
    deliveries = await w.ok("GET", f"/v1/webhooks/{w.b.subscription_id}/deliveries", w.key_b)
    assert not w.leaks(orjson.dumps(deliveries).decode())
    # B's subflow step naming A's flow a-approval starts no run of A's flow: B has no such flow.
    parent = await w.run(w.b.parent_run, w.key_b)
    assert parent["status"] == "FAILED" and parent["failed_step"] == "spawn"
    child_id = next(s for s in parent["steps"] if s["name"] == "spawn")["output"]["child_run_id"]
    child = await w.run(child_id, w.key_b)
    assert child["status"] == "INVALID" and child["parent_run_id"] == w.b.parent_run
    assert (await w.call("GET", f"/v1/runs/{child_id}", w.key_a)).status_code == 404
    a_approvals = (await w.ok("GET", "/v1/runs", w.key_a, params={"flow_id": "a-approval"}))["data"]
    assert [r["id"] for r in a_approvals] == [w.a.runs["paused"]]


# ---------------------------------------------------------------- 5. environments (smoke; see test_runs_api)


async def test_a_testing_key_and_a_production_key_see_their_own_environment_only(world: World) -> None:
    w, a = world, world.a
    testing = (await w.ok("GET", "/v1/runs", w.key_a_test, params={"include_archived": "true"}))["data"]
    assert [r["id"] for r in testing] == [a.test_run]
    assert [f["id"] for f in (await w.ok("GET", "/v1/flows", w.key_a_test))["data"]] == ["a-probe"]
    assert (await w.call("GET", f"/v1/runs/{a.runs['failed']}", w.key_a_test)).status_code == 404
    assert (await w.call("GET", f"/v1/runs/{a.test_run}", w.key_a)).status_code == 404
    production = (await w.ok("GET", "/v1/runs", w.key_a, params={"include_archived": "true", "limit": 100}))["data"]
    assert a.test_run not in {r["id"] for r in production}
    # Neither key starts runs of the other environment's flows.
    r = await w.env.ingest("POST", "/v1/flows/a-fails/trigger", w.key_a_test, json={"input": {}})
    assert r.status_code == 404, r.text
    r = await w.env.ingest("POST", "/v1/flows/a-probe/trigger", w.key_a, json={"input": {}})
    assert r.status_code == 404, r.text
