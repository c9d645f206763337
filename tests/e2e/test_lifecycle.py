"""Every run status and the run actions, on real processes and the real broker (issue: executor lifecycle).

Time runs 100 times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01): a `delay` of 100 s, a retry
backoff, a human_input expiry or a flow timeout of 100 s take one real second.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from schemas.flows import FlowDefinition
from tests.conftest import Infra
from tests.harness import Env, KeySpec, answer, delayed, flow, publish_flows, running, stub_upstream, wait_until

SLOW_S = 3.0
FLAKY = {"fails": True}  # /flaky answers 422 until a test flips this


async def _flaky(request: web.Request) -> web.Response:
    if FLAKY["fails"]:
        return web.json_response({"error": "warehouse offline"}, status=422)
    return web.json_response({"reserved": True})


ROUTES = {("POST", "/flaky"): _flaky, ("GET", "/slow"): delayed(SLOW_S, answer({"late": True}))}


def _flows(upstream: str) -> list[FlowDefinition]:
    def a(id: str, steps: list[dict[str, Any]], tenant: str = "tenant-a", **extra: Any) -> FlowDefinition:
        return flow(tenant, id, steps, **extra)

    shape = {"name": "shape", "action": "transform", "input": {"output": {"ok": True}}}
    return [
        a("quick", [shape]),
        a("versioned", [shape]),
        a("quick", [shape], tenant="tenant-b"),  # the same flow id in another tenant is another flow
        a("limited", [{"name": "hold", "action": "delay", "input": {"seconds": 60}}], concurrency_limit=1),
        a("guarded", [shape], input_schema={
            "type": "object", "required": ["order_id"],
            "properties": {"order_id": {"type": "string", "pattern": "^SO-"}, "qty": {"type": "integer", "minimum": 1}},
        }),
        a("approval", [
            {"name": "prepare", "action": "transform", "input": {"output": {"order": "{{ trigger.order_id }}"}}},
            {"name": "approve", "action": "human_input",
             "input": {"question": "Ship order {{ steps.prepare.output.order }}?", "fields": ["approved", "by"]}},
            {"name": "ship", "action": "transform",
             "input": {"output": {"shipped": "{{ steps.approve.output.approved }}",
                                  "by": "{{ steps.approve.output.by }}"}}},
        ]),
        a("expiring", [{"name": "approve", "action": "human_input", "input": {"question": "?"}, "timeout_s": 100}]),
        a("slowstep", [{"name": "call", "action": "http_request", "timeout_s": 0.3, "retry": {"delays_s": []},
                           "input": {"method": "GET", "url": upstream + "/slow"}}]),
        a("deadline", [shape, {"name": "wait", "action": "delay", "input": {"seconds": 1000}}], timeout_s=50),
        a("long", [shape, {"name": "wait", "action": "delay", "input": {"seconds": 3000}}]),
        a("child", [{"name": "double", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}",
                                                                                     "tag": "child"}}}]),
        a("failing_child", [{"name": "reserve", "action": "http_request", "retry": {"delays_s": []},
                                "input": {"method": "POST", "url": upstream + "/flaky", "body": {}}}]),
        a("parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "child", "input": {"n": "{{ trigger.n }}"}}},
            {"name": "use", "action": "transform",
             "input": {"output": {"from_child": "{{ steps.spawn.output.output.n }}"}}},
        ]),
        a("testing_parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "child", "input": {"n": 1}}},
        ], environment="TESTING"),
        a("strict_parent", [
            {"name": "spawn", "action": "subflow", "input": {"flow_id": "failing_child", "input": {}}},
            {"name": "after", "action": "transform", "input": {"output": {"ran": True}}},
        ]),
        a("lenient_parent", [
            {"name": "spawn", "action": "subflow",
             "input": {"flow_id": "failing_child", "input": {}, "fail_parent_on_failure": False}},
            {"name": "after", "action": "transform", "input": {"output": {"child": "{{ steps.spawn.output.status }}"}}},
        ]),
        a("reserve", [
            {"name": "price", "action": "transform", "input": {"output": {"total": 42}}},
            {"name": "reserve", "action": "http_request", "retry": {"delays_s": []},
             "input": {"method": "POST", "url": upstream + "/flaky",
                       "body": {"total": "{{ steps.price.output.total }}"}}},
            {"name": "confirm", "action": "transform",
             "input": {"output": {"done": "{{ steps.reserve.output.body.reserved }}"}}},
        ]),
        a("metered", [{"name": "hold", "action": "delay", "input": {"seconds": 100}}], tenant="tenant-q"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"a": "tenant-a", "b": "tenant-b", "q": "tenant-q",
                                      "test": KeySpec("tenant-a", "TESTING")}  # fmt: skip
    extra = {
        "FLOWTRAIL_EXECUTOR_SESSION_TIMEOUT_S": "6",
        "FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01",
        "FLOWTRAIL_EXECUTOR_TENANT_QUOTAS": '{"tenant-q": 1}',
    }
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, keys=keys, flows=_flows(up.url), env=extra, upstream=up
    ) as env:  # fmt: skip
        yield env


# ---------------------------------------------------------------- statuses


async def test_a_run_at_a_future_time_waits_scheduled_then_runs(env: Env) -> None:
    run_at = datetime.now(UTC) + timedelta(seconds=2)
    run_id = await env.trigger("quick", {}, run_at=run_at.isoformat())

    scheduled = await env.wait_status(run_id, {"SCHEDULED"})
    assert scheduled["started_at"] is None
    run = await env.wait_status(run_id)
    assert run["status"] == "SUCCEEDED"
    assert datetime.fromisoformat(run["started_at"]) >= run_at
    assert await env.event_types(run_id) == [
        "RunRequested", "RunScheduled", "RunQueued", "RunStarted", "StepStarted", "StepSucceeded", "RunSucceeded"
    ]  # fmt: skip


async def test_a_flow_at_its_concurrency_limit_blocks_runs_and_unblocks_them_in_arrival_order(env: Env) -> None:
    ids = [await env.trigger("limited", {"n": i}) for i in range(3)]

    blocked = [await env.wait_status(run_id, {"BLOCKED", "RUNNING"}) for run_id in ids]
    assert sorted(r["status"] for r in blocked) == ["BLOCKED", "BLOCKED", "RUNNING"]
    runs = [await env.wait_status(run_id) for run_id in ids]
    assert all(r["status"] == "SUCCEEDED" for r in runs)
    starts = [datetime.fromisoformat(r["started_at"]) for r in runs]
    ends = [datetime.fromisoformat(r["finished_at"]) for r in runs]
    assert starts == sorted(starts)  # arrival order
    assert starts[1] >= ends[0] and starts[2] >= ends[1]  # never two at once
    assert "RunBlocked" in await env.event_types(ids[2])


async def test_a_tenant_over_its_quota_gets_quota_exceeded(env: Env) -> None:
    first = await env.trigger("metered", {}, key="q")
    await env.wait_status(first, {"RUNNING"}, key="q")
    second = await env.trigger("metered", {}, key="q")

    refused = await env.wait_status(second, key="q")
    assert refused["status"] == "QUOTA_EXCEEDED"
    assert "quota is 1" in refused["error_message"]
    assert (await env.wait_status(first, key="q"))["status"] == "SUCCEEDED"


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"qty": 2}, "order_id"), ({"order_id": "PO-1"}, "order_id"), ({"order_id": "SO-1", "qty": 0}, "qty")],
)
async def test_an_input_that_breaks_the_flow_schema_makes_the_run_invalid_with_the_reason(
    env: Env, payload: dict[str, Any], field: str
) -> None:
    run = await env.wait_status(await env.trigger("guarded", payload))

    assert run["status"] == "INVALID"
    assert "input schema" in run["error_message"] and field in run["error_message"]
    assert run["steps"] == []  # nothing ran
    nothing_failed = await env.api("POST", f"/v1/runs/{run['id']}/retry", json={"strategy": "FROM_FAILED_STEP"})
    assert nothing_failed.status_code == 409 and "ON_LATEST_VERSION" in nothing_failed.json()["error"]["message"]
    rerun = await env.api("POST", f"/v1/runs/{run['id']}/retry", json={"strategy": "ON_LATEST_VERSION"})
    assert rerun.status_code == 202  # e.g. after a version that fixes the schema; here it is INVALID again
    assert (await env.wait_status(rerun.json()["run_id"]))["status"] == "INVALID"
    ok = await env.wait_status(await env.trigger("guarded", {"order_id": "SO-7", "qty": 3}))
    assert ok["status"] == "SUCCEEDED"


async def test_an_approval_pauses_on_human_input_and_resumes_with_its_request_id(env: Env) -> None:
    run_id = await env.trigger("approval", {"order_id": "SO-9"})
    paused = await env.wait_status(run_id, {"PAUSED"})

    waiting = paused["waiting_for"]
    assert waiting["step"] == "approve" and waiting["prompt"]["question"] == "Ship order SO-9?"
    request_id = waiting["request_id"]
    wrong = await env.api("POST", f"/v1/runs/{run_id}/resume/req_wrong", json={"approved": True})
    assert wrong.status_code == 409 and request_id in wrong.json()["error"]["message"]
    other_tenant = await env.api("POST", f"/v1/runs/{run_id}/resume/{request_id}", "b", json={})
    assert other_tenant.status_code == 404

    r = await env.api("POST", f"/v1/runs/{run_id}/resume/{request_id}", json={"approved": True, "by": "ops@acme"})
    assert r.status_code == 202, r.text
    run = await env.wait_status(run_id)
    assert run["status"] == "SUCCEEDED"
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["approve"]["output"] == {"approved": True, "by": "ops@acme"}
    assert steps["ship"]["output"] == {"shipped": True, "by": "ops@acme"}
    types = await env.event_types(run_id)
    assert types[types.index("RunPaused") + 1] == "RunResumed"


async def test_an_unanswered_human_input_times_out(env: Env) -> None:
    run = await env.wait_status(await env.trigger("expiring", {}))

    assert run["status"] == "TIMED_OUT"
    assert run["failed_step"] == "approve" and "no answer" in run["error_message"]


async def test_a_step_past_its_timeout_ends_the_run_timed_out(env: Env) -> None:
    run = await env.wait_status(await env.trigger("slowstep", {}))

    assert run["status"] == "TIMED_OUT"
    assert run["failed_step"] == "call" and "timed out" in run["error_message"]
    assert run["duration_ms"] < SLOW_S * 1000  # it did not wait for the slow answer


async def test_a_run_past_the_flow_timeout_ends_timed_out_naming_the_step_it_was_in(env: Env) -> None:
    run = await env.wait_status(await env.trigger("deadline", {}))

    assert run["status"] == "TIMED_OUT"
    assert run["error_message"] == "the flow timeout of 50s passed while step 'wait' was running"
    assert run["failed_step"] == "wait"
    steps = {s["name"]: s["status"] for s in run["steps"]}
    assert steps == {"shape": "SUCCEEDED", "wait": "FAILED"}

    # Its failure group names the step and says what to do about a timeout, not "retries are automatic".
    async def its_group() -> dict[str, Any] | None:
        groups = (await env.api("GET", "/v1/analytics/failure-groups")).json()["data"]
        return next((g for g in groups if g["flow_id"] == "deadline"), None)

    group = await wait_until(its_group, 20, "the deadline's failure group", every=0.1)
    assert group is not None and group["step"] == "wait"
    assert "timeout" in group["next_action"] and "retries are automatic" not in group["next_action"]
    assert run["duration_ms"] < 5000  # the delay (10 s scaled) was abandoned at the deadline (0.5 s scaled)


async def test_cancel_abandons_the_in_flight_step_and_records_it_canceled(env: Env) -> None:
    run_id = await env.trigger("long", {})
    await env.wait_status(run_id, {"RUNNING"})
    other = await env.api("POST", f"/v1/runs/{run_id}/cancel", "b", json={})
    assert other.status_code == 404  # another tenant cannot even see it

    r = await env.api("POST", f"/v1/runs/{run_id}/cancel", json={"reason": "customer asked"})
    assert r.status_code == 202, r.text
    run = await env.wait_status(run_id, within=10)
    assert run["status"] == "CANCELED"
    assert {s["name"]: s["status"] for s in run["steps"]}["wait"] == "CANCELED"
    assert run["duration_ms"] < 10_000
    again = await env.api("POST", f"/v1/runs/{run_id}/cancel", json={})
    assert again.status_code == 409 and "CANCELED" in again.json()["error"]["message"]
    assert (await env.event_types(run_id))[-3:] == ["RunCancelRequested", "StepCanceled", "RunCanceled"]


# ---------------------------------------------------------------- subflows


async def test_a_subflow_runs_a_child_and_the_parent_uses_its_output(env: Env) -> None:
    run = await env.wait_status(await env.trigger("parent", {"n": 21}))

    assert run["status"] == "SUCCEEDED", run
    spawn = {s["name"]: s for s in run["steps"]}["spawn"]
    child_id = spawn["output"]["child_run_id"]
    assert spawn["output"]["status"] == "SUCCEEDED"
    child = await env.wait_status(child_id)
    assert child["parent_run_id"] == run["id"] and child["trigger"]["type"] == "subflow"
    assert {s["name"]: s for s in run["steps"]}["use"]["output"] == {"from_child": 21}


async def test_a_failed_child_fails_its_parent_unless_told_otherwise(env: Env) -> None:
    FLAKY["fails"] = True
    strict = await env.wait_status(await env.trigger("strict_parent", {}))
    lenient = await env.wait_status(await env.trigger("lenient_parent", {}))

    assert strict["status"] == "FAILED" and strict["failed_step"] == "spawn"
    assert "ended FAILED" in strict["error_message"]
    assert "after" not in {s["name"] for s in strict["steps"]}
    assert lenient["status"] == "SUCCEEDED"
    assert {s["name"]: s for s in lenient["steps"]}["after"]["output"] == {"child": "FAILED"}


async def test_a_testing_runs_children_are_testing_runs(env: Env) -> None:
    run = await env.wait_status(await env.trigger("testing_parent", {}, key="test"), key="test")
    assert run["status"] == "SUCCEEDED" and run["environment"] == "TESTING"
    child_id = run["steps"][0]["output"]["child_run_id"]
    child = await env.wait_status(child_id, key="test")
    assert child["environment"] == "TESTING" and child["parent_run_id"] == run["id"]
    assert (await env.api("GET", f"/v1/runs/{child_id}")).status_code == 404  # not a PRODUCTION run


# ---------------------------------------------------------------- retry and rerun


async def test_retry_from_the_failed_step_reuses_what_succeeded_and_links_the_runs(env: Env) -> None:
    FLAKY["fails"] = True
    failed = await env.wait_status(await env.trigger("reserve", {"order": 1}))
    assert failed["status"] == "FAILED" and failed["failed_step"] == "reserve"
    FLAKY["fails"] = False
    logs = (await env.api("GET", f"/v1/runs/{failed['id']}/logs", params={"level": "ERROR"})).json()["data"]
    assert [(line["level"], line["step"]) for line in logs] == [("ERROR", "reserve")]
    assert "VALIDATION" in logs[0]["message"] and "422" in logs[0]["message"]

    r = await env.api("POST", f"/v1/runs/{failed['id']}/retry", json={"strategy": "FROM_FAILED_STEP"})
    assert r.status_code == 202, r.text
    retried = await env.wait_status(r.json()["run_id"])

    assert retried["status"] == "SUCCEEDED" and retried["retry_of"] == failed["id"]
    assert retried["trigger"]["type"] == "retry" and retried["trigger"]["payload"] == {"order": 1}
    steps = {s["name"]: s for s in retried["steps"]}
    assert steps["price"]["output"] == {"total": 42}  # reused, not run again
    assert steps["confirm"]["output"] == {"done": True}
    types = await env.event_types(retried["id"])
    assert types.count("StepStarted") == 2  # reserve and confirm; price was reused
    listed = await env.api("GET", "/v1/runs", params={"ids": retried["id"]})
    assert listed.json()["data"][0]["retry_of"] == failed["id"]


async def test_a_run_shows_its_flow_version_and_a_rerun_uses_the_latest(env: Env) -> None:
    ok = await env.wait_status(await env.trigger("versioned", {}))
    assert ok["flow"]["version"] == 1 and [s["name"] for s in ok["flow"]["steps"]] == ["shape"]
    refused = await env.api("POST", f"/v1/runs/{ok['id']}/retry", json={"strategy": "FROM_FAILED_STEP"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
    bad = await env.api("POST", f"/v1/runs/{ok['id']}/retry", json={"strategy": "SOMETIMES"})
    assert bad.status_code == 422

    v2 = flow("tenant-a", "versioned", [{"name": "reshape", "action": "transform", "input": {"output": 2}}], version=2)
    await publish_flows(env.sandbox, [v2])
    rerun = await env.api("POST", f"/v1/runs/{ok['id']}/retry", json={"strategy": "ON_LATEST_VERSION"})
    assert rerun.status_code == 202
    fresh = await env.wait_status(rerun.json()["run_id"])
    assert fresh["status"] == "SUCCEEDED" and fresh["flow_version"] == 2 and fresh["retry_of"] == ok["id"]
    assert [s["name"] for s in fresh["steps"]] == ["reshape"]
    old = await env.wait_status(ok["id"])
    assert old["flow"]["version"] == 1 and [s["name"] for s in old["flow"]["steps"]] == ["shape"]  # as it ran


# ---------------------------------------------------------------- bulk


async def test_bulk_cancel_dry_run_counts_then_cancels_and_records_the_operation(env: Env) -> None:
    ids = [await env.trigger("long", {"i": i}) for i in range(3)]
    for run_id in ids:
        await env.wait_status(run_id, {"RUNNING"})
    body = {"flow_id": "long", "statuses": ["RUNNING"], "exclude_ids": [ids[0]]}

    dry = await env.api("POST", "/v1/runs/bulk/cancel", json={**body, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["count"] >= 2 and dry.json()["bulk_operation_id"] is None
    assert ids[0] not in {r["id"] for r in dry.json()["sample"]}
    assert (await env.wait_status(ids[1], {"RUNNING"}))["status"] == "RUNNING"  # a dry run changes nothing

    r = await env.api("POST", "/v1/runs/bulk/cancel", json=body)
    assert r.status_code == 202, r.text
    bulk_id = r.json()["bulk_operation_id"]
    for run_id in ids[1:]:
        assert (await env.wait_status(run_id, within=10))["status"] == "CANCELED"
    assert (await env.wait_status(ids[0], {"RUNNING"}))["status"] == "RUNNING"  # excluded
    await env.api("POST", f"/v1/runs/{ids[0]}/cancel", json={})

    touched = await env.api("GET", "/v1/runs", params={"bulk_operation_id": bulk_id, "limit": 100})
    assert set(ids[1:]) <= {run["id"] for run in touched.json()["data"]}
    assert ids[0] not in {run["id"] for run in touched.json()["data"]}


async def test_bulk_retry_and_archive_by_failed_step(env: Env) -> None:
    FLAKY["fails"] = True
    failed = [await env.wait_status(await env.trigger("reserve", {"order": i})) for i in range(2)]
    FLAKY["fails"] = False
    ids = [r["id"] for r in failed]

    r = await env.api("POST", "/v1/runs/bulk/retry", json={"ids": ids, "strategy": "FROM_FAILED_STEP"})
    assert r.status_code == 202, r.text
    assert r.json()["count"] == 2 and len(r.json()["new_run_ids"]) == 2
    retries = [await env.wait_status(run_id) for run_id in r.json()["new_run_ids"]]
    assert {x["status"] for x in retries} == {"SUCCEEDED"} and {x["retry_of"] for x in retries} == set(ids)
    made = await env.api("GET", "/v1/runs", params={"bulk_operation_id": r.json()["bulk_operation_id"]})
    assert {x["id"] for x in made.json()["data"]} == set(r.json()["new_run_ids"])

    archive = await env.api("POST", "/v1/runs/bulk/archive", json={"ids": ids})
    assert archive.status_code == 202 and archive.json()["count"] == 2

    async def hidden() -> bool:
        return (await env.api("GET", "/v1/runs", params={"ids": ids})).json()["data"] == []

    await wait_until(hidden, 15, "archived runs left out of the list")
    shown = await env.api("GET", "/v1/runs", params={"ids": ids, "include_archived": "true"})
    assert {x["id"] for x in shown.json()["data"]} == set(ids) and all(x["archived"] for x in shown.json()["data"])
    assert (await env.event_types(ids[0]))[-1] == "RunArchived"


async def test_bulk_actions_never_reach_another_tenants_runs(env: Env) -> None:
    theirs = await env.wait_status(await env.trigger("quick", {}, key="b"), key="b")
    r = await env.api("POST", "/v1/runs/bulk/archive", json={"ids": [theirs["id"]], "dry_run": True})
    assert r.status_code == 200 and r.json()["count"] == 0
    everything = await env.api("POST", "/v1/runs/bulk/cancel", json={})
    assert everything.status_code == 422 and "filter" in everything.json()["error"]["message"]
    unknown = await env.api("POST", "/v1/runs/bulk/cancel", json={"flow_id": "long", "explode": True})
    assert unknown.status_code == 422


# ---------------------------------------------------------------- execution modes


async def test_live_mode_waits_for_the_final_status_and_answers_the_result(env: Env) -> None:
    async def live(flow_id: str, **body: Any) -> Any:
        return await env.ingest("POST", f"/v1/flows/{flow_id}/trigger", json={"mode": "live", "input": {}, **body},
                                timeout=40)  # fmt: skip

    ok = await live("quick")
    FLAKY["fails"] = True
    failed = await live("reserve")
    later = await live("quick", run_at="2030-01-01T00:00:00Z")
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "SUCCEEDED" and ok.json()["output"] == {"ok": True}
    assert failed.status_code == 200 and failed.json()["status"] == "FAILED"
    # No result for a failed run (an earlier step's output is not its result); the failing step's own, labelled.
    assert failed.json()["output"] is None and failed.json()["failed_step"]
    assert "failed_step_output" in failed.json()
    assert failed.json()["error"]["category"] == "VALIDATION"
    assert later.status_code == 422 and "run_at" in later.json()["error"]["message"]


async def test_live_mode_answers_a_pause_at_once_with_what_it_waits_for(env: Env) -> None:
    started = time.monotonic()
    body = {"mode": "live", "input": {"order_id": "SO-77"}}
    paused = await env.ingest("POST", "/v1/flows/approval/trigger", json=body, timeout=40)
    assert time.monotonic() - started < 10  # not the 30 s live timeout
    assert paused.status_code == 202 and paused.json()["status"] == "PAUSED", paused.text
    waiting = paused.json()["waiting_for"]
    assert waiting["step"] == "approve" and waiting["prompt"]["question"] == "Ship order SO-77?"
