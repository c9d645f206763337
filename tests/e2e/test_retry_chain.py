"""Retries you can chain, on real processes and the real broker (issue 12): a run retried FROM_FAILED_STEP three
generations deep, each failing at a later step, runs every step that succeeded exactly once across the chain.

The flow calls a loopback upstream that counts calls per path: a login whose extracted `user_id` later steps use, a
profile read that answers 503 its first two times, a sync_records step whose destination refuses one record its
first two times (the run goes on, then ends FAILED or PARTIAL), and a notification refused the first time.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from schemas.flows import FlowDefinition
from tests.conftest import Infra
from tests.harness import Env, answer, assert_verify_equal, first_calls, flow, running, stub_upstream

RECORDS = [
    {"id": "r1", "name": "Ada", "updated_at": "2024-01-01T00:00:00+00:00"},
    {"id": "r2", "name": "Grace", "updated_at": "2024-01-01T00:00:01+00:00"},
]


async def _user(request: web.Request) -> web.Response:
    return web.json_response({"id": int(request.match_info["id"]), "name": "Ada Lovelace"})


async def _written(request: web.Request) -> web.Response:
    return web.json_response({"id": f"dest-{(await request.json())['key']}"}, status=201)


REFUSED = answer({"error": "name rejected", "field": "name"}, 422)
ROUTES = {
    ("POST", "/login"): answer({"id": 42, "token": "tok"}),
    # The first two reads fail: the step's two attempts in generation 1.
    ("GET", "/users/{id}"): first_calls(2, answer({"error": "profile service warming up"}, 503), _user),
    ("GET", "/records"): answer({"records": RECORDS}),
    # r2 is refused its first two writes.
    ("POST", "/sink"): first_calls(lambda c: 2 if c.json()["key"] == "r2" else 0, REFUSED, _written,
                                   per=lambda c: c.json()["key"]),
    ("POST", "/notify"): first_calls(1, answer({"error": "notification channel not configured"}, 422),
                                     answer({"sent": True})),
}  # fmt: skip


def _flow(upstream: str) -> FlowDefinition:
    once: dict[str, Any] = {"delays_s": []}
    return flow("tenant-a", "chain", [
        {"name": "login", "action": "http_request", "retry": once,
         "input": {"method": "POST", "url": upstream + "/login", "body": {"user": "{{ trigger.user }}"}},
         "extract": {"user_id": "body.id"}},
        {"name": "profile", "action": "http_request", "retry": {"delays_s": [1]},
         "input": {"method": "GET", "url": upstream + "/users/{{ vars.user_id }}"}},
        {"name": "sync", "action": "sync_records", "retry": once,
         "input": {"source": {"kind": "http", "url": upstream + "/records", "records_path": "records"},
                   "destination": {"kind": "http", "url": upstream + "/sink"},
                   "key": "id", "updated_at": "updated_at", "mapping": {"key": "id", "name": "name"}}},
        {"name": "notify", "action": "http_request", "retry": once,
         "input": {"method": "POST", "url": upstream + "/notify",
                   "body": {"user": "{{ vars.user_id }}", "name": "{{ steps.profile.output.body.name }}"}}},
    ])  # fmt: skip


async def _retry(env: Env, run_id: str) -> dict[str, Any]:
    r = await env.api("POST", f"/v1/runs/{run_id}/retry", json={"strategy": "FROM_FAILED_STEP"})
    assert r.status_code == 202, r.text
    assert r.json()["retry_of"] == run_id
    return await env.wait_status(r.json()["run_id"])


async def _started_steps(env: Env, run_id: str) -> list[str]:
    return [e["payload"]["step"] for e in await env.events(run_id, limit=1000) if e["type"] == "StepStarted"]


async def _retries_of(env: Env, run_id: str) -> list[str]:
    return [run["id"] for run in (await env.ok("GET", "/v1/runs", params={"retry_of": run_id}))["data"]]


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, flows=[_flow(up.url)], upstream=up, env={"FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01"}
    ) as env:  # fmt: skip
        yield env


async def test_a_retry_of_a_retry_of_a_retry_runs_each_succeeded_step_once_and_links_the_runs(env: Env) -> None:
    up = env.upstream
    # Generation 1: login succeeds, the profile read fails twice (two attempts) and ends the run.
    gen1 = await env.wait_status(await env.trigger("chain", {"user": "ada"}))
    assert (gen1["status"], gen1["failed_step"]) == ("FAILED", "profile")

    # Generation 2: login reused; the profile read renders the reused extraction; r2 is refused; notify fails.
    gen2 = await _retry(env, gen1["id"])
    assert (gen2["status"], gen2["failed_step"]) == ("FAILED", "notify"), gen2
    assert await _started_steps(env, gen2["id"]) == ["profile", "sync", "notify"]

    # Generation 3: login and profile reused, the sync runs again for r2 only (refused again), notify succeeds.
    gen3 = await _retry(env, gen2["id"])
    assert gen3["status"] == "PARTIAL", gen3
    assert await _started_steps(env, gen3["id"]) == ["sync", "notify"]

    # Generation 4: everything but the sync reused; r2 goes through.
    gen4 = await _retry(env, gen3["id"])
    assert gen4["status"] == "SUCCEEDED", gen4
    assert await _started_steps(env, gen4["id"]) == ["sync"]

    # The upstream saw each successful call once across the chain.
    assert up.statuses("/login", "POST") == [200]
    assert up.statuses("/users/42", "GET") == [503, 503, 200]  # the extracted user id, rendered in gen 2
    assert up.statuses("/notify", "POST") == [422, 200]
    notified = [c.json() for c in up.seen("/notify")]
    assert [b["user"] for b in notified] == [42, 42] and notified[1]["name"] == "Ada Lovelace"
    sink = [(c.json()["key"], c.status) for c in up.seen("/sink")]
    assert Counter(k for k, status in sink if status == 201) == {"r1": 1, "r2": 1}
    assert [s for k, s in sink if k == "r2"] == [422, 422, 201]
    # A sync with failed records reads its window again to find them (gens 2, 3 and 4); it writes only those.
    assert up.statuses("/records", "GET") == [200, 200, 200]

    # The timeline: reused steps in flow order, with action, input and the run where they ran.
    steps = gen4["steps"]
    assert [s["name"] for s in steps] == ["login", "profile", "sync", "notify"]
    assert [s["position"] for s in steps] == [0, 1, 2, 3]
    assert [s["status"] for s in steps] == ["SUCCEEDED"] * 4
    assert [s["action"] for s in steps] == ["http_request", "http_request", "sync_records", "http_request"]
    assert [s["reused_from"] for s in steps] == [gen1["id"], gen2["id"], None, gen3["id"]]
    login, profile, _, notify = steps
    assert login["input"]["url"] == up.url + "/login" and login["extractions"] == {"user_id": 42}
    assert profile["input"]["url"] == up.url + "/users/42" and profile["output"]["body"]["name"] == "Ada Lovelace"
    assert notify["input"]["body"] == {"user": 42, "name": "Ada Lovelace"}
    gen3_steps = {s["name"]: s for s in (await env.api("GET", f"/v1/runs/{gen3['id']}")).json()["steps"]}
    assert gen3_steps["login"]["reused_from"] == gen1["id"]  # where it ran, not the run retried
    assert gen3_steps["sync"]["reused_from"] is None and gen3_steps["notify"]["reused_from"] is None

    # Lineage both ways, and the runs list filters by it.
    chain = [gen1, gen2, gen3, gen4]
    for older, newer in itertools.pairwise(chain):
        assert newer["retry_of"] == older["id"] and newer["retry_strategy"] == "FROM_FAILED_STEP"
        detail = (await env.api("GET", f"/v1/runs/{older['id']}")).json()
        assert [(r["id"], r["strategy"], r["status"]) for r in detail["retries"]] == [
            (newer["id"], "FROM_FAILED_STEP", newer["status"])
        ]
        assert await _retries_of(env, older["id"]) == [newer["id"]]
    assert gen1["retry_of"] is None and gen1["retry_strategy"] is None
    assert gen4["retries"] == [] and await _retries_of(env, gen4["id"]) == []

    # A rebuild from the ledger equals the live read models (`flowtrail projector verify`).
    await assert_verify_equal(env.sandbox)
