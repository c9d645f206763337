"""The launch API (docs/runs.md) and triggers at both base URLs (docs/decisions.md), on real processes: actions by
flow id or declared name, async and live; resuming a paused or stopped run; the schedules list with pause and resume;
the same trigger answered the same on ingest's port and the API's, from one rate-limit budget.

Time runs 100 times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.flows import FlowDefinition, TriggerConfig
from services.common.schedule import Schedule
from tests.conftest import Infra
from tests.harness import Env, KeySpec, api_error, flow, running, steps_of, wait_until

pytestmark = pytest.mark.e2e

TRIGGER_BUDGET = 30


def _flows() -> list[FlowDefinition]:
    shape = {"name": "shape", "action": "transform", "input": {"output": {"hello": "{{ trigger.name }}"}}}
    return [
        flow("tenant-a", "greet", [shape], action_name="say-hello"),
        flow("tenant-a", "twin-1", [shape], action_name="twin"),
        flow("tenant-a", "twin-2", [shape], action_name="twin"),
        flow("tenant-a", "to-pause", [shape]),
        flow("tenant-a", "checked", [{"name": "check", "action": "transform", "input": {"output": {"total": 5}},
                                      "assertions": [{"expression": "total", "expected": 6}]}]),
        flow("tenant-a", "approval", [
            {"name": "prepare", "action": "transform", "input": {"output": {"order": "{{ trigger.order_id }}"}}},
            {"name": "approve", "action": "human_input", "input": {"question": "Ship {{ trigger.order_id }}?"}},
            {"name": "ship", "action": "transform", "input": {"output": {"by": "{{ steps.approve.output.by }}"}}},
        ]),
        flow("tenant-a", "daily", [shape], trigger={"type": "schedule", "cron": "0 6 * * *"}),
        flow("tenant-a", "hourly", [shape], trigger={"type": "schedule", "interval_s": 3600}),
        flow("tenant-b", "daily-b", [shape], trigger={"type": "schedule", "cron": "0 7 * * *"}),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {
        "a": "tenant-a", "launch": "tenant-a", "refuse": "tenant-a", "live": "tenant-a", "big": "tenant-a",
        "budget": "tenant-a", "same": "tenant-a", "resume": "tenant-a", "b": "tenant-b",
        "reader": KeySpec("tenant-a", scopes=["runs:read"]),
    }  # fmt: skip
    extra = {
        "FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01",
        "FLOWTRAIL_API_RATE_LIMIT_TRIGGERS": str(TRIGGER_BUDGET),
        "FLOWTRAIL_INGEST_RATE_LIMIT_TRIGGERS": str(TRIGGER_BUDGET),
        "FLOWTRAIL_API_RATE_LIMIT_READS": "100000",  # the tests poll runs; trigger budgets are what they count
    }
    async with running(infra, tmp_path_factory, keys=keys, flows=_flows(), env=extra) as env:
        yield env


async def _post(env: Env, service: str, path: str, key: str = "a", **kwargs: Any) -> Any:
    return await env.request(service, "POST", path, key, **kwargs)


# ---------------------------------------------------------------- one intake at both base URLs


async def test_the_same_trigger_gets_the_same_answer_on_both_ports(env: Env) -> None:
    answers = {}
    for service in ("ingest", "api"):
        accepted = await _post(env, service, "/v1/flows/greet/trigger", "same", json={"input": {"name": service}})
        assert accepted.status_code == 202, accepted.text
        batch = await _post(env, service, "/v1/flows/greet/trigger", "same", json={"inputs": [{"name": "x"}] * 3})
        assert batch.status_code == 202 and batch.json()["count"] == 3
        unknown = await _post(env, service, "/v1/flows/nope/trigger", "same", json={"input": {}})
        both = await _post(env, service, "/v1/flows/greet/trigger", "same", json={"input": 1, "inputs": [1]})
        version = await _post(env, service, "/v1/flows/greet/trigger", "same", json={"flow_version": 9})
        answers[service] = [
            (accepted.status_code, accepted.json()["status"], sorted(accepted.json())),
            (unknown.status_code, api_error(unknown, 404, "not_found")),
            (both.status_code, api_error(both, 422, "validation_error")),
            (version.status_code, api_error(version, 404, "not_found")),
        ]
        run = await env.wait_status(accepted.json()["run_id"])
        assert run["status"] == "SUCCEEDED" and run["trigger_type"] == "api" and run["execution_mode"] == "async"
        assert steps_of(run)["shape"]["output"] == {"hello": service}
    assert answers["ingest"] == answers["api"]
    assert answers["api"][0] == (202, "QUEUED", ["run_id", "status"])

    # The same Idempotency-Key on the other port is the same request: the first answer, the same run.
    headers = {"Idempotency-Key": "same-on-both-ports"}
    first = await _post(env, "ingest", "/v1/flows/greet/trigger", "same", json={"input": {}}, headers=headers)
    again = await _post(env, "api", "/v1/flows/greet/trigger", "same", json={"input": {}}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"

    # Both OpenAPI documents declare the trigger and the launch routes.
    for service in ("ingest", "api"):
        paths = (await env.http.get(env.url(service) + "/openapi.json")).json()["paths"]
        assert {"/v1/flows/{flow_id}/trigger", "/v1/actions/{action_name}/async",
                "/v1/actions/{action_name}/live"} <= set(paths), service  # fmt: skip


async def test_triggers_on_both_ports_spend_one_rate_limit_budget(env: Env) -> None:
    remaining = []
    paths = ["/v1/flows/greet/trigger", "/v1/actions/say-hello/async"]
    for i in range(TRIGGER_BUDGET):
        service = ("ingest", "api")[i % 2]
        r = await _post(env, service, paths[i // 2 % 2], "budget", json={"input": {"name": str(i)}})
        assert r.status_code == 202, (service, r.text)
        assert r.headers["x-ratelimit-limit"] == str(TRIGGER_BUDGET)
        remaining.append(int(r.headers["x-ratelimit-remaining"]))
    # Each request, at either port, took one from the same budget.
    assert remaining == list(range(TRIGGER_BUDGET - 1, -1, -1))
    for service, path in (("api", paths[0]), ("ingest", paths[1]), ("api", "/v1/actions/greet/live")):
        refused = await _post(env, service, path, "budget", json={"input": {}})
        api_error(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
    # Reads and other writes have budgets of their own.
    assert (await env.api("GET", "/v1/runs?limit=1", "budget")).status_code == 200


async def test_the_api_takes_trigger_bodies_as_large_as_ingest_does(env: Env) -> None:
    # ~1.2 MB, over the API's 1 MiB for other writes; SCHEDULED far ahead, so the executor only records them.
    inputs = [{"name": "x" * 800, "i": i} for i in range(1_500)]
    run_at = (datetime.now(UTC) + timedelta(days=10)).isoformat()
    r = await _post(env, "api", "/v1/actions/say-hello/async", "big", json={"inputs": inputs, "run_at": run_at})
    assert r.status_code == 202, r.text[:500]
    assert r.json()["count"] == 1_500 and len(set(r.json()["run_ids"])) == 1_500
    run = await env.wait_status(r.json()["run_ids"][-1], {"SCHEDULED"}, key="big")
    assert run["trigger"]["payload"] == inputs[-1]
    big = {"id": "big", "name": "x" * 1_200_000, "steps": []}
    api_error(await env.api("POST", "/v1/flows", json=big), 413, "payload_too_large")


# ---------------------------------------------------------------- actions: async and live


async def test_an_async_action_starts_runs_by_flow_id_or_declared_name(env: Env) -> None:
    by_name = await _post(env, "api", "/v1/actions/say-hello/async", "launch", json={"input": {"name": "ada"}})
    assert by_name.status_code == 202 and by_name.json()["status"] == "QUEUED", by_name.text
    run = await env.wait_status(by_name.json()["run_id"], key="launch")
    assert (run["flow_id"], run["status"], run["execution_mode"]) == ("greet", "SUCCEEDED", "async")
    assert steps_of(run)["shape"]["output"] == {"hello": "ada"}

    many = await _post(env, "ingest", "/v1/actions/greet/async", "launch", json={"inputs": [{"name": "a"}] * 4})
    assert many.status_code == 202 and many.json()["count"] == 4
    statuses = await env.wait_all(many.json()["run_ids"], key="launch")
    assert set(statuses.values()) == {"SUCCEEDED"}

    later = datetime.now(UTC) + timedelta(hours=1)
    scheduled = await _post(env, "api", "/v1/actions/greet/async", "launch",
                            json={"input": {}, "run_at": later.isoformat()})  # fmt: skip
    assert scheduled.status_code == 202 and scheduled.json()["status"] == "SCHEDULED"


async def test_an_async_action_refuses_bad_requests_with_the_error_envelope(env: Env) -> None:
    async_path = "/v1/actions/{}/async"
    cases = [
        ("refuse", async_path.format("nope"), {"input": {}}, 404, "not_found", "no flow with id or action_name"),
        ("refuse", async_path.format("twin"), {"input": {}}, 409, "conflict", "'twin-1', 'twin-2'"),
        ("refuse", async_path.format("greet"), {"input": 1, "inputs": [1]}, 422, "validation_error", "not both"),
        ("refuse", async_path.format("greet"), {"inputs": []}, 422, "validation_error", "at least one"),
        ("refuse", async_path.format("greet"), {"mode": "live"}, 422, "validation_error", "mode"),
        ("refuse", async_path.format("greet"), {"run_at": "2026-01-01"}, 422, "validation_error", "run_at"),
        ("refuse", async_path.format("greet"), {"flow_version": 0}, 422, "validation_error", "flow_version"),
        ("refuse", async_path.format("greet"), {"flow_version": 7}, 404, "not_found", "no version 7"),
        ("b", async_path.format("greet"), {"input": {}}, 404, "not_found", "greet"),  # another tenant's flow
        ("reader", async_path.format("greet"), {"input": {}}, 403, "forbidden", "runs:write"),
        ("refuse", "/v1/actions/greet/live", {"inputs": [{}]}, 422, "validation_error", "inputs"),
        ("refuse", "/v1/actions/greet/live", {"run_at": "2030-01-01T00:00:00Z"}, 422, "validation_error", "run_at"),
    ]
    for key, path, body, status, code, words in cases:
        for service in ("api", "ingest"):
            message = api_error(await _post(env, service, path, key, json=body), status, code)
            assert words in message, (service, path, body, message)
    no_key = await env.http.post(env.url("api") + "/v1/actions/greet/async", json={"input": {}})
    api_error(no_key, 401, "unauthorized")
    # A paused flow is refused by name too, until resumed.
    await env.ok("POST", "/v1/flows/to-pause/pause", "refuse")
    message = api_error(await _post(env, "api", async_path.format("to-pause"), "refuse", json={}), 409, "conflict")
    assert "paused" in message
    await env.ok("POST", "/v1/flows/to-pause/resume", "refuse")
    assert (await _post(env, "api", async_path.format("to-pause"), "refuse", json={})).status_code == 202


async def test_a_live_action_answers_the_runs_result(env: Env) -> None:
    ok = await _post(env, "api", "/v1/actions/say-hello/live", "live", json={"input": {"name": "grace"}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "SUCCEEDED" and ok.json()["output"] == {"hello": "grace"}
    run = await env.run(ok.json()["run_id"], key="live")
    assert run is not None and run["execution_mode"] == "live"

    failed = await _post(env, "ingest", "/v1/actions/checked/live", "live", json={"input": {}})
    assert failed.status_code == 200 and failed.json()["status"] == "FAILED", failed.text
    assert failed.json()["failed_step"] == "check" and failed.json()["output"] is None
    assert failed.json()["failed_step_output"] == {"total": 5}

    paused = await _post(env, "api", "/v1/actions/approval/live", "live", json={"input": {"order_id": "SO-1"}})
    assert paused.status_code == 202 and paused.json()["status"] == "PAUSED", paused.text
    assert paused.json()["waiting_for"]["step"] == "approve"


# ---------------------------------------------------------------- resume: a paused run, a stopped run


async def test_resume_answers_a_paused_runs_pending_request(env: Env) -> None:
    run_id = await env.trigger("approval", {"order_id": "SO-2"}, key="resume")
    request_id = (await env.wait_status(run_id, {"PAUSED"}, key="resume"))["waiting_for"]["request_id"]

    r = await env.api("POST", f"/v1/runs/{run_id}/resume", "resume", json={"action": "resume", "input": {"by": "ops"}})
    assert r.status_code == 202, r.text
    assert r.json() == {"run_id": run_id, "status": "RESUME_REQUESTED", "resumed": "human_input",
                        "request_id": request_id, "resumed_from": None}  # fmt: skip
    run = await env.wait_status(run_id, key="resume")
    assert run["status"] == "SUCCEEDED" and steps_of(run)["ship"]["output"] == {"by": "ops"}


async def test_resume_continues_a_stopped_run_reusing_what_succeeded(env: Env) -> None:
    run_id = await env.trigger("approval", {"order_id": "SO-3"}, key="resume")
    await env.wait_status(run_id, {"PAUSED"}, key="resume")
    await env.ok("POST", f"/v1/runs/{run_id}/cancel", "resume", status=202, json={"reason": "stop for now"})
    assert (await env.wait_status(run_id, key="resume"))["status"] == "CANCELED"

    r = await env.api("POST", f"/v1/runs/{run_id}/resume", "resume")
    assert r.status_code == 202, r.text
    assert r.json()["resumed"] == "continued" and r.json()["resumed_from"] == run_id
    assert r.json()["status"] == "QUEUED"
    continued = r.json()["run_id"]
    run = await env.wait_status(continued, {"PAUSED"}, key="resume")
    assert run["retry_of"] == run_id and run["retry_strategy"] == "FROM_FAILED_STEP"
    steps = steps_of(run)
    # What succeeded is not run again: `prepare` is reused from the stopped run; the run waits at `approve` again.
    assert steps["prepare"]["reused_from"] == run_id and steps["prepare"]["output"] == {"order": "SO-3"}
    assert run["waiting_for"]["step"] == "approve"

    again = await env.api("POST", f"/v1/runs/{continued}/resume", "resume", json={"input": {"by": "lead"}})
    assert again.status_code == 202 and again.json()["resumed"] == "human_input", again.text
    done = await env.wait_status(continued, key="resume")
    assert done["status"] == "SUCCEEDED" and steps_of(done)["ship"]["output"] == {"by": "lead"}


async def test_resume_refuses_runs_that_are_neither_paused_nor_stopped(env: Env) -> None:
    succeeded = await env.trigger("greet", {"name": "x"}, key="resume")
    await env.wait_status(succeeded, key="resume")
    failed = await env.trigger("checked", {}, key="resume")
    assert (await env.wait_status(failed, key="resume"))["status"] == "FAILED"
    canceled = await env.trigger("approval", {"order_id": "SO-4"}, key="resume")
    await env.wait_status(canceled, {"PAUSED"}, key="resume")
    await env.ok("POST", f"/v1/runs/{canceled}/cancel", "resume", status=202)
    await env.wait_status(canceled, {"CANCELED"}, key="resume")

    assert "SUCCEEDED" in api_error(await env.api("POST", f"/v1/runs/{succeeded}/resume", "resume"), 409, "conflict")
    assert "/retry" in api_error(await env.api("POST", f"/v1/runs/{failed}/resume", "resume"), 409, "conflict")
    api_error(await env.api("POST", "/v1/runs/run_nope/resume", "resume"), 404, "not_found")
    api_error(await env.api("POST", f"/v1/runs/{succeeded}/resume", "b"), 404, "not_found")  # another tenant
    api_error(await env.api("POST", f"/v1/runs/{succeeded}/resume", "reader"), 403, "forbidden")
    answer = {"input": {"by": "x"}}
    message = api_error(await env.api("POST", f"/v1/runs/{canceled}/resume", "resume", json=answer), 422)
    assert "only a PAUSED run" in message
    api_error(await env.api("POST", f"/v1/runs/{canceled}/resume", "resume", json={"action": "stop"}), 422)


# ---------------------------------------------------------------- schedules


def _next(trigger: dict[str, Any]) -> datetime:
    ticks = Schedule.of(TriggerConfig.model_validate(trigger))
    assert ticks is not None
    tick = ticks.next_after(datetime.now(UTC))
    assert tick is not None
    return tick


async def test_the_schedules_list_shows_next_fire_times_and_pending_runs(env: Env) -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    pending = await _post(env, "api", "/v1/actions/greet/async", json={"input": {}, "run_at": later.isoformat()})
    run_id = pending.json()["run_id"]
    await env.wait_status(run_id, {"SCHEDULED"})

    async def listed() -> Any:
        page = await env.ok("GET", "/v1/schedules")
        times = {p["run_id"]: p["run_at"] for p in page["pending_runs"]}
        return page if times.get(run_id) else None

    page = await wait_until(listed, what="the run_at run listed with its time")
    schedules = {s["flow_id"]: s for s in page["schedules"]}
    assert sorted(schedules) == ["daily", "hourly"]  # schedule flows of this tenant only
    daily = schedules["daily"]
    assert (daily["cron"], daily["interval_s"], daily["timezone"], daily["status"]) == ("0 6 * * *", None, "UTC",
                                                                                        "active")  # fmt: skip
    assert datetime.fromisoformat(daily["next_run_at"]) == _next({"type": "schedule", "cron": "0 6 * * *"})
    assert datetime.fromisoformat(schedules["hourly"]["next_run_at"]) == _next({"type": "schedule", "interval_s": 3600})
    mine = next(p for p in page["pending_runs"] if p["run_id"] == run_id)
    assert mine["flow_id"] == "greet" and datetime.fromisoformat(mine["run_at"]) == later

    one = await env.ok("GET", "/v1/schedules?flow_id=daily&limit=5")
    assert [s["flow_id"] for s in one["schedules"]] == ["daily"] and one["pending_runs"] == []
    other = await env.ok("GET", "/v1/schedules", "b")
    assert [s["flow_id"] for s in other["schedules"]] == ["daily-b"] and other["pending_runs"] == []
    assert "flowId" in api_error(await env.api("GET", "/v1/schedules?flowId=daily"), 422, "validation_error")
    api_error(await env.api("GET", "/v1/schedules?limit=0"), 422, "validation_error")
    api_error(await env.http.get(env.url("api") + "/v1/schedules"), 401, "unauthorized")


async def test_a_schedule_pauses_and_resumes(env: Env) -> None:
    paused = await env.ok("POST", "/v1/schedules/hourly/pause", json={"reason": "maintenance"})
    assert paused["status"] == "paused" and paused["next_run_at"] is None
    listed = {s["flow_id"]: s for s in (await env.ok("GET", "/v1/schedules"))["schedules"]}
    assert listed["hourly"]["status"] == "paused"
    # A paused schedule's flow is paused: its triggers are refused too.
    api_error(await _post(env, "api", "/v1/flows/hourly/trigger", json={"input": {}}), 409, "conflict")
    assert (await env.ok("POST", "/v1/schedules/hourly/pause"))["status"] == "paused"  # idempotent

    resumed = await env.ok("POST", "/v1/schedules/hourly/resume")
    assert resumed["status"] == "active"
    assert datetime.fromisoformat(resumed["next_run_at"]) == _next({"type": "schedule", "interval_s": 3600})

    assert "schedule" in api_error(await env.api("POST", "/v1/schedules/greet/pause"), 404, "not_found")
    api_error(await env.api("POST", "/v1/schedules/nope/resume"), 404, "not_found")
    api_error(await env.api("POST", "/v1/schedules/daily/pause", "b"), 404, "not_found")  # another tenant's
    api_error(await env.api("POST", "/v1/schedules/daily/pause", "reader"), 403, "forbidden")
    api_error(await env.api("POST", "/v1/schedules/daily/pause", json={"why": "x"}), 422, "validation_error")
