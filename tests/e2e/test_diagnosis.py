"""GET /v1/runs/{id}/diagnosis on real processes and the real broker: histories built by running flows against
loopback upstreams the test serves — a flaky step, an upstream outage, a bad record and a failed assertion, a timeout
that came with a new flow version — each diagnosed from the read models with its evidence and next action.

Time runs 100 times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01): a 1 s backoff takes 10 ms.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Infra
from tests.harness import CALL, Env, answer, api_error, delayed, first_calls, running, stub_upstream, wait_until

# Connectors on loopback may be registered (the shop upstream below is one).
ENV = {"FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01", "FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true"}


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with running(infra, tmp_path_factory, keys={"a": "tenant-a", "b": "tenant-b"},
                       env=ENV) as env:  # fmt: skip
        yield env


def http_step(name: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "action": "http_request", "input": {"method": "GET", "url": url}, **fields}


async def runs_of(env: Env, flow_id: str, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trigger one run per input, one after another so their order is their creation order; each run's detail."""
    out = []
    for payload in inputs:
        out.append(await env.wait_status(await env.trigger(flow_id, payload), within=60))
    return out


async def diagnosis(env: Env, run_id: str, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = await env.ok("GET", f"/v1/runs/{run_id}/diagnosis", params=params)
    return body


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def fired(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A diagnosis's evidence by rule."""
    return {e["rule"]: e for e in found["evidence"]}


async def test_a_flaky_step_that_passed_on_retry_in_other_runs_is_diagnosed_flaky(env: Env) -> None:
    # Each run reads its own path; `fails` says how many of its calls answer 503 before one answers 200.
    routes = {
        ("GET", "/stock/{sku}"): first_calls(
            lambda c: int(c.query.get("fails", "0")), answer({"error": "stock service busy"}, 503), answer({"units": 4})
        )
    }
    async with stub_upstream(routes) as up:
        await env.create_flow({"id": "stock-check", "name": "Stock check", "steps": [
            http_step("read", up.url + "/stock/{{ trigger.sku }}?fails={{ trigger.fails }}", retry={"delays_s": [1]}),
        ]})  # fmt: skip
        history = await runs_of(env, "stock-check", [
            {"sku": "SKU-101", "fails": 0}, {"sku": "SKU-102", "fails": 1}, {"sku": "SKU-103", "fails": 0},
            {"sku": "SKU-104", "fails": 1}, {"sku": "SKU-105", "fails": 1},
        ])  # fmt: skip
        assert [r["status"] for r in history] == ["SUCCEEDED"] * 5
        failed = (await runs_of(env, "stock-check", [{"sku": "SKU-106", "fails": 2}]))[0]
        assert failed["status"] == "FAILED"

        body = await diagnosis(env, failed["id"])
    assert (body["run_id"], body["flow_id"], body["status"], body["failed"]) == (failed["id"], "stock-check",
                                                                                 "FAILED", True)  # fmt: skip
    found = body["diagnosis"]
    assert found["step"] == {"name": "read", "action": "http_request", "attempts": 2, "retry_delays_s": [1.0],
                             "timeout_s": None}  # fmt: skip
    error = found["error"]
    assert (error["category"], error["code"], error["status_code"]) == ("TRANSIENT", "http_status", 503)
    assert error["message"] == f"GET {up.url}/stock/SKU-106?fails=2 answered 503 Service Unavailable"
    # The same fingerprint the failure groups and the runs filter use.
    groups = (await env.ok("GET", "/v1/analytics/failure-groups", params={"flow_id": "stock-check"}))["data"]
    assert [g["fingerprint"] for g in groups] == [error["fingerprint"]]
    listed = await env.ok("GET", "/v1/runs", params={"error_fingerprint": error["fingerprint"]})
    assert [r["id"] for r in listed["data"]] == [failed["id"]]

    h = found["history"]
    assert (h["last_n"], h["runs"], h["occurrences"], h["passed_on_retry"]) == (50, 6, 4, 3)
    assert h["since_version"] == 1 and h["appeared_with_version"] is False
    assert h["first_seen_run_id"] == history[1]["id"]
    assert found["root_cause"] == "upstream_service_error"
    assert fired(found)["passed_on_retry_elsewhere"]["observed"] == {"occurrences": 4, "passed_on_retry": 3,
                                                                     "runs": 6}  # fmt: skip
    assert found["next_action"] == (
        "4 of the last 6 runs failed with this fingerprint since version 1, and every other one passed on retry. "
        "The step is flaky: this run used all 2 attempts of step read: add attempts or lengthen its "
        "`retry.delays_s` (now [1.0])."
    )
    # Fewer runs looked at: the window is the last N up to this run.
    small = (await diagnosis(env, failed["id"], last_n=2))["diagnosis"]["history"]
    assert (small["runs"], small["occurrences"], small["passed_on_retry"]) == (2, 2, 1)


async def test_an_upstream_outage_across_runs_is_diagnosed_as_the_upstream_s_and_names_the_host(env: Env) -> None:
    healthy = {"up": True}

    async def orders(request: web.Request) -> web.Response:
        if healthy["up"]:
            return web.json_response({"id": request.match_info["id"], "total": 10})
        return web.json_response({"error": "upstream connect error"}, status=503)

    async with stub_upstream({("GET", "/orders/{id}"): orders}) as up:
        await env.create_flow({"id": "order-import", "name": "Order import", "steps": [
            http_step("fetch", up.url + "/orders/{{ trigger.order }}", retry={"delays_s": []}),
        ]})  # fmt: skip
        before = await runs_of(env, "order-import", [{"order": f"SO-{n}"} for n in (1, 2, 3)])
        healthy["up"] = False
        during = await runs_of(env, "order-import", [{"order": f"SO-{n}"} for n in (4, 5, 6, 7, 8)])
        assert [r["status"] for r in before + during] == ["SUCCEEDED"] * 3 + ["FAILED"] * 5
        body = await diagnosis(env, during[-1]["id"])

    found = body["diagnosis"]
    assert found["root_cause"] == "upstream_service_error"
    h = found["history"]
    assert (h["runs"], h["occurrences"], h["passed_on_retry"], h["first_seen_run_id"]) == (8, 5, 0, during[0]["id"])
    dep = found["dependency"]
    host = up.url.removeprefix("http://")
    assert (dep["kind"], dep["name"], dep["status"]) == ("host", host, None)
    # Other runs around this one's time: the three before the outage worked, the four during it failed.
    assert (dep["failures"], dep["successes"], dep["failed_runs"], dep["succeeded_runs"]) == (4, 3, 4, 3)
    assert dep["failure_categories"] == {"TRANSIENT": 4}
    assert dep["last_success_at"] == before[-1]["steps"][0]["finished_at"]
    assert fired(found)["dependency_failing_for_others"]["observed"] == {
        "kind": "host", "name": host, "failures": 4, "successes": 3, "failed_runs": 4,
        "categories": {"TRANSIENT": 4},
    }  # fmt: skip
    assert found["scores"] == {"upstream_service_error": 8}
    assert found["next_action"].startswith(
        f"5 of the last 8 runs failed with this fingerprint since version 1. Host {host} failed 4 of 7 calls from "
        "4 other run(s) between "
    ), found["next_action"]
    assert found["next_action"].endswith(
        "The upstream is down, not this run: check its status and logs, then retry the failed runs from the failed "
        "step (POST /v1/runs/bulk/retry) once it answers."
    )


async def test_a_bad_record_and_a_failed_assertion_are_data_problems_with_actual_against_expected(env: Env) -> None:
    async def customers(request: web.Request) -> web.Response:
        body = request[CALL].json()
        if "@" not in str(body.get("email")):
            return web.json_response({"error": "email is invalid", "field": "email"}, status=422)
        return web.json_response({"id": "cus_1", "status": "active"}, status=201)

    routes = {("POST", "/customers"): customers, ("GET", "/invoices/{id}"): answer({"status": "refunded", "total": 7})}
    async with stub_upstream(routes) as up:
        await env.create_flow({"id": "customer-push", "name": "Customer push", "steps": [
            {"name": "push", "action": "http_request", "retry": {"delays_s": []},
             "input": {"method": "POST", "url": up.url + "/customers", "body": {"email": "{{ trigger.email }}"}}},
        ]})  # fmt: skip
        await env.create_flow({"id": "invoice-check", "name": "Invoice check", "steps": [
            http_step("check", up.url + "/invoices/{{ trigger.invoice }}", retry={"delays_s": []},
                      assertions=[{"expression": "status", "expected": 200},
                                  {"expression": "body.status", "expected": "paid"}]),
        ]})  # fmt: skip
        good = await runs_of(env, "customer-push", [{"email": f"user{n}@example.com"} for n in range(3)])
        bad = (await runs_of(env, "customer-push", [{"email": "not-an-address"}]))[0]
        assert [r["status"] for r in good] == ["SUCCEEDED"] * 3 and bad["status"] == "FAILED"
        invoice = (await runs_of(env, "invoice-check", [{"invoice": "INV-9"}]))[0]
        assert invoice["status"] == "FAILED"

        bad_body = await diagnosis(env, bad["id"])
        invoice_body = await diagnosis(env, invoice["id"])

    found = bad_body["diagnosis"]
    assert found["root_cause"] == "data_validation"
    assert (found["error"]["category"], found["error"]["status_code"]) == ("VALIDATION", 422)
    assert fired(found)["invalid_data"]["observed"] == {"category": "VALIDATION", "code": "http_status",
                                                        "status_code": 422}  # fmt: skip
    assert found["history"]["occurrences"] == 1 and found["assertion"] is None
    assert found["next_action"].startswith(
        "No other of the last 4 runs of the flow failed this way: this run is the first. Step push was refused as "
        f"invalid (422: POST {up.url}/customers answered 422 Unprocessable Entity); this run's input is the suspect"
    ), found["next_action"]

    found = invoice_body["diagnosis"]
    assert found["root_cause"] == "data_validation"
    assert found["assertion"] == {"expression": "body.status", "operator": "eq", "expected": "paid",
                                  "actual": "refunded"}  # fmt: skip
    assert found["error"]["code"] == "assertion_failed"
    assert "The assertion `body.status eq 'paid'` saw 'refunded': if 'refunded' is right now, update the assertion" in (
        found["next_action"])  # fmt: skip


async def test_a_partial_sync_is_diagnosed_by_the_records_its_destination_rejected(env: Env) -> None:
    contacts = [{"id": "c-1", "email": "ada@example.com", "updated_at": "2026-01-01T00:00:00+00:00"},
                {"id": "c-2", "email": "not-an-address", "updated_at": "2026-01-01T00:00:01+00:00"}]  # fmt: skip

    async def sink(request: web.Request) -> web.Response:
        body = await request.json()
        if "@" not in body["email"]:
            return web.json_response({"error": "email is invalid", "field": "email"}, status=422)
        return web.json_response({"id": f"dest-{body['key']}"}, status=201)

    async with stub_upstream({("GET", "/contacts"): answer({"records": contacts}), ("POST", "/sink"): sink}) as up:
        await env.create_flow({"id": "contact-sync", "name": "Contact sync", "steps": [
            {"name": "sync", "action": "sync_records", "retry": {"delays_s": []}, "input": {
                "source": {"kind": "http", "url": up.url + "/contacts", "records_path": "records"},
                "destination": {"kind": "http", "url": up.url + "/sink"},
                "key": "id", "updated_at": "updated_at", "mapping": {"key": "id", "email": "email"}}},
        ]})  # fmt: skip
        run = (await runs_of(env, "contact-sync", [{}]))[0]
        assert run["status"] == "PARTIAL", run
        body = await diagnosis(env, run["id"])

    assert (body["status"], body["failed"]) == ("PARTIAL", True)
    found = body["diagnosis"]
    assert found["root_cause"] == "data_validation"
    assert found["step"]["name"] == "sync" and found["step"]["action"] == "sync_records"
    rejected = found["rejected_records"]
    assert (rejected["count"], rejected["first_key"]) == (1, "c-2"), rejected
    assert found["error"]["message"] == "1 record(s) failed"  # the run's own words
    assert rejected["first_error"] == "422 Unprocessable Entity: email is invalid"
    assert fired(found)["records_rejected"]["observed"]["count"] == 1
    assert "1 record(s) were rejected (first: c-2" in found["next_action"], found["next_action"]
    assert "(only the rejected records run again)" in found["next_action"]


async def test_a_timeout_that_came_with_a_new_flow_version_names_the_changed_timeout(env: Env) -> None:
    async with stub_upstream({("GET", "/report"): delayed(0.5, answer({"rows": 12}))}) as up:
        # The request's own timeout is long: the step's timeout_s is what runs out.
        step = {
            "name": "build",
            "action": "http_request",
            "retry": {"delays_s": []},
            "timeout_s": 5,
            "input": {"method": "GET", "url": up.url + "/report", "timeout_s": 30},
        }
        flow = {"id": "nightly-report", "name": "Nightly report", "steps": [step]}
        await env.create_flow(flow)
        v1 = await runs_of(env, "nightly-report", [{"n": n} for n in range(3)])
        assert [(r["status"], r["flow_version"]) for r in v1] == [("SUCCEEDED", 1)] * 3
        r = await env.api("POST", "/v1/flows/nightly-report/versions",
                          json={**flow, "steps": [{**step, "timeout_s": 0.2}]})  # fmt: skip
        assert r.status_code in (201, 202), r.text

        async def on_version_2() -> bool:
            return (await env.ok("GET", "/v1/flows/nightly-report"))["latest_version"] == 2

        await wait_until(on_version_2, 30, "version 2 projected")
        v2 = await runs_of(env, "nightly-report", [{"n": n} for n in range(3, 6)])
        assert [(r["status"], r["flow_version"]) for r in v2] == [("TIMED_OUT", 2)] * 3
        body = await diagnosis(env, v2[-1]["id"])

    found = body["diagnosis"]
    assert found["root_cause"] == "timing_timeout"
    assert found["error"]["code"] == "timeout" and found["step"]["timeout_s"] == 0.2
    h = found["history"]
    assert (h["occurrences"], h["since_version"], h["appeared_with_version"]) == (3, 2, True)
    assert [(v["version"], v["runs"], v["occurrences"]) for v in h["by_version"]] == [(1, 3, 0), (2, 3, 3)]
    assert h["step_median_success_ms"] >= 500
    assert found["step_change"] == {"from_version": 1, "to_version": 2, "changes": [
        {"field": "steps.build.timeout_s", "before": 5.0, "after": 0.2}]}  # fmt: skip
    rules = fired(found)
    assert rules["changed_with_version"]["supports"] == "timing_timeout"
    assert rules["timeout_below_usual_duration"]["observed"]["timeout_s"] == 0.2
    assert found["next_action"].startswith(
        "3 of the last 6 runs failed with this fingerprint since version 2 (none of the 3 runs of earlier versions "
        "had it). Version 2 changed steps.build.timeout_s from 5 s to 0.2 s; its successful attempts took a median "
        f"of {h['step_median_success_ms']:g} ms: raise it back above that"
    ), found["next_action"]


async def test_credentials_refused_through_a_connector_show_its_health_and_say_rotate_them(env: Env) -> None:
    async def orders(request: web.Request) -> web.Response:
        if request.headers.get("X-Api-Key") != "shop-key-1":
            return web.json_response({"error": "invalid api key"}, status=401)
        return web.json_response({"orders": [{"id": "o-1", "total": 3}]})

    async def sink(request: web.Request) -> web.Response:
        return web.json_response({"id": (await request.json())["order"]}, status=201)

    async with stub_upstream({("GET", "/orders"): orders, ("POST", "/sink"): sink}) as shop:
        assert (await env.api("PUT", "/v1/secrets/SHOP_KEY", json={"value": "shop-key-1"})).status_code == 201
        await env.ok("POST", "/v1/connectors", status=201, json={"name": "shop", "kind": "http", "config": {
            "url": shop.url, "headers": {"X-Api-Key": "{{ secrets.SHOP_KEY }}"}}})  # fmt: skip
        await env.create_flow({"id": "shop-sync", "name": "Shop sync", "steps": [
            {"name": "sync", "action": "sync_records", "retry": {"delays_s": []}, "input": {
                "source": {"kind": "http", "connector": "shop", "path": "/orders", "records_path": "orders"},
                "destination": {"kind": "http", "connector": "shop", "path": "/sink"},
                "key": "id", "mapping": {"order": "id", "total": "total"}}},
        ]})  # fmt: skip
        worked = await runs_of(env, "shop-sync", [{}, {}])
        assert [r["status"] for r in worked] == ["SUCCEEDED"] * 2
        # The key is replaced by a wrong one: every run from now on is refused.
        assert (await env.api("PUT", "/v1/secrets/SHOP_KEY", json={"value": "shop-key-0"})).status_code == 200
        refused = await runs_of(env, "shop-sync", [{}, {}])
        assert [r["status"] for r in refused] == ["FAILED"] * 2
        body = await diagnosis(env, refused[-1]["id"])

    found = body["diagnosis"]
    assert found["root_cause"] == "auth_or_config"
    assert found["error"]["category"] == "AUTH"
    dep = found["dependency"]
    assert (dep["kind"], dep["name"], dep["status"]) == ("connector", "shop", "degraded")
    assert (dep["failures"], dep["successes"], dep["failure_categories"]) == (1, 2, {"AUTH": 1})
    first = refused[0]  # degraded since the first refused run, while it ran
    assert _at(first["started_at"]) <= _at(dep["degraded_since"]) <= _at(first["finished_at"]), (dep, first)
    assert {"credentials_rejected", "connector_degraded"} <= set(fired(found))
    assert found["next_action"].startswith(
        "2 of the last 4 runs failed with this fingerprint since version 1. Connector shop is degraded since "
    ), found["next_action"]
    assert "rotate its credentials (the tenant's secrets) and check it with POST /v1/connectors/{id}/verify" in (
        found["next_action"])  # fmt: skip


async def test_a_run_that_did_not_fail_has_no_diagnosis_and_other_tenants_runs_are_not_found(env: Env) -> None:
    await env.create_flow({"id": "fine", "name": "Fine", "steps": [
        {"name": "only", "action": "transform", "input": {"output": {"ok": True}}}]})  # fmt: skip
    ok = (await runs_of(env, "fine", [{}]))[0]
    body = await diagnosis(env, ok["id"])
    assert body == {"run_id": ok["id"], "flow_id": "fine", "flow_version": 1, "status": "SUCCEEDED", "failed": False,
                    "message": "the run succeeded: nothing to diagnose", "diagnosis": None}  # fmt: skip

    r = await env.api("GET", f"/v1/runs/{ok['id']}/diagnosis", key="b")
    assert "no run with id" in api_error(r, 404, "not_found")
    r = await env.api("GET", "/v1/runs/run_missing/diagnosis")
    assert api_error(r, 404, "not_found") == "no run with id 'run_missing'"
    r = await env.api("GET", f"/v1/runs/{ok['id']}/diagnosis", params={"last_n": 0})
    assert "last_n" in api_error(r, 422, "validation_error")
    r = await env.api("GET", f"/v1/runs/{ok['id']}/diagnosis", params={"lastN": 5})
    assert "unknown query parameter 'lastN'" in api_error(r, 422, "validation_error")
