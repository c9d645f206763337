"""The flows API on real processes (projector, api, ingest) and the real broker and database: create, list,
publish versions, read old versions, pause and resume (with ingest refusing triggers while paused), and the
errors a caller gets for bad definitions, duplicates, another tenant's flow and a key without `flows:write`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.events import FlowVersionPublished
from schemas.flows import STORED_FLOW, FlowDefinition
from services.common.kafka import publish_flow_events
from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import Env, KeySpec, append_ledger, flow_body, running, wait_until
from tests.harness import api_error as error


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {
        "admin": "tenant-a",
        "test": KeySpec("tenant-a", environment="TESTING"),
        "reader": KeySpec("tenant-a", scopes=("runs:read", "runs:write")),
        "other": "tenant-b",
    }
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api", "ingest")) as env:
        yield env


async def create(env: Env, body: dict[str, Any], key: str = "admin") -> dict[str, Any]:
    return dict(await env.ok("POST", "/v1/flows", key, status=201, json=body))


async def test_a_created_flow_is_listed_with_filters_totals_and_cursor_pages(env: Env) -> None:
    made = await create(env, flow_body("orders-sync", "fetch", "push", tags=["orders", "nightly"]))
    # The answer is the flow as GET shows it: the projector caught up before the API answered.
    assert made["projected"] is True and made["version"] == 1 and made["status"] == "active"
    assert made["environment"] == "PRODUCTION" and [s["name"] for s in made["definition"]["steps"]] == ["fetch", "push"]
    await create(env, flow_body("invoices-sync", tags=["invoices"], trigger={"type": "webhook"}))
    nightly = {"type": "schedule", "cron": "0 2 * * *"}
    await create(env, flow_body("customers-nightly", tags=["nightly"], trigger=nightly))
    await create(env, flow_body("testing-only"), key="test")
    await create(env, flow_body("b-flow"), key="other")

    async with env.client() as api:
        body = (await api.get("/v1/flows")).json()
        assert [f["id"] for f in body["data"]] == ["customers-nightly", "invoices-sync", "orders-sync"]
        assert body["meta"] == {"total": 3, "has_more": False} and body["next_cursor"] is None

        async def ids(**params: Any) -> list[str]:
            r = await api.get("/v1/flows", params=params)
            assert r.status_code == 200, r.text
            return [f["id"] for f in r.json()["data"]]

        assert await ids(tag="nightly") == ["customers-nightly", "orders-sync"]
        assert await ids(tag="nightly,orders") == ["orders-sync"]
        assert await ids(trigger_type="schedule") == ["customers-nightly"]
        assert await ids(trigger_type="manual,webhook") == ["invoices-sync", "orders-sync"]
        assert await ids(q="SYNC") == ["invoices-sync", "orders-sync"]
        assert await ids(status="paused") == []
        assert await ids(environment="production") == await ids()

        pages, cursor = [], None
        while True:
            r = (await api.get("/v1/flows", params={"limit": 2, **({"cursor": cursor} if cursor else {})})).json()
            assert r["meta"]["total"] == 3 and r["meta"]["has_more"] == (r["next_cursor"] is not None)
            pages.append([f["id"] for f in r["data"]])
            if not (cursor := r["next_cursor"]):
                break
        assert pages == [["customers-nightly", "invoices-sync"], ["orders-sync"]]

        assert error(await api.get("/v1/flows", params={"limit": 101}), 422, "validation_error").startswith("limit")
        assert "status" in error(await api.get("/v1/flows", params={"status": "sleeping"}), 422, "validation_error")
        error(await api.get("/v1/flows", params={"cursor": "not-a-cursor"}), 400, "invalid_request")
        error(await api.get("/v1/flows", params={"environment": "TESTING"}), 403, "forbidden")
    # A test key sees TESTING flows only; another tenant sees its own only.
    async with env.client(key="test") as api:
        assert [f["id"] for f in (await api.get("/v1/flows")).json()["data"]] == ["testing-only"]
        error(await api.get("/v1/flows/orders-sync"), 404, "not_found")
    async with env.client(key="other") as api:
        assert (await api.get("/v1/flows")).json()["meta"]["total"] == 1


async def test_a_new_version_is_the_latest_and_the_old_one_stays_readable(env: Env) -> None:
    await create(env, flow_body("versioned", "a"))
    async with env.client() as api:
        r = await api.post("/v1/flows/versioned/versions", json=flow_body("versioned", "a", "b", name="Versioned v2"))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 2 and r.json()["latest_version"] == 2

        detail = (await api.get("/v1/flows/versioned")).json()
        assert detail["name"] == "Versioned v2" and detail["latest_version"] == 2
        assert [s["name"] for s in detail["definition"]["steps"]] == ["a", "b"]
        assert [v["version"] for v in detail["versions"]] == [2, 1]

        v1 = (await api.get("/v1/flows/versioned/versions/1")).json()
        assert v1["version"] == 1 and [s["name"] for s in v1["definition"]["steps"]] == ["a"]
        assert v1["definition"]["name"] == "Versioned"
        error(await api.get("/v1/flows/versioned/versions/3"), 404, "not_found")
        # The path names the flow; a body naming another is refused rather than silently re-pointed.
        r = await api.post("/v1/flows/versioned/versions", json=flow_body("elsewhere", "a"))
        assert error(r, 422, "validation_error").startswith("id:")
        error(await api.post("/v1/flows/no-such-flow/versions", json=flow_body("no-such-flow")), 404, "not_found")


async def test_concurrent_publishes_get_distinct_consecutive_versions(env: Env) -> None:
    await create(env, flow_body("busy"))
    async with env.client() as api:
        answers = await asyncio.gather(
            *(api.post("/v1/flows/busy/versions", json=flow_body("busy", f"s{i}")) for i in range(6))
        )
        assert all(r.status_code == 201 for r in answers), [r.text for r in answers]
        assert sorted(r.json()["version"] for r in answers) == [2, 3, 4, 5, 6, 7]
        detail = (await api.get("/v1/flows/busy")).json()
        assert [v["version"] for v in detail["versions"]] == [7, 6, 5, 4, 3, 2, 1]
        # Each version holds the definition its own request sent.
        for r in answers:
            version = (await api.get(f"/v1/flows/busy/versions/{r.json()['version']}")).json()
            assert version["definition"]["steps"] == r.json()["definition"]["steps"]


async def test_detail_shows_schedule_connectors_last_run_and_masks_credentials(env: Env) -> None:
    body = flow_body("warehouse", trigger={"type": "schedule", "cron": "*/15 * * * *"})
    body["steps"] = [
        {"name": "read", "action": "database_query",
         "input": {"connector": "orders-db", "query": "SELECT 1", "password": "hunter2"}},
        {"name": "send", "action": "kafka_produce", "input": {"connector": "events", "topic": "t", "value": 1}},
        {"name": "sync", "action": "sync_records",
         "input": {"source": {"connector": "orders-db"}, "destination": {"connector": "crm"}}},
        {"name": "call", "action": "http_request",
         "input": {"url": "https://example.com", "headers": {"Authorization": "Bearer s3cret"}}},
    ]  # fmt: skip
    await create(env, body)
    started = datetime.now(UTC) - timedelta(minutes=5)
    ran = run_events("run-w1", tenant_id="tenant-a", flow_id="warehouse", steps=1, start=started)
    await append_ledger(env.sandbox, ran)
    async with env.client() as api:

        async def with_last_run() -> dict[str, Any] | None:
            d = dict((await api.get("/v1/flows/warehouse")).json())
            return d if d["last_run_at"] else None

        detail = await wait_until(with_last_run)
        listed = next(f for f in (await api.get("/v1/flows")).json()["data"] if f["id"] == "warehouse")
    assert datetime.fromisoformat(detail["last_run_at"]) == started
    assert listed["last_run_at"] == detail["last_run_at"] and listed["connectors"] == ["crm", "events", "orders-db"]

    sched = detail["schedule"]
    assert sched["cron"] == "*/15 * * * *" and sched["interval_s"] is None and sched["timezone"] == "UTC"
    next_run = datetime.fromisoformat(sched["next_run_at"])
    assert datetime.now(UTC) - timedelta(seconds=5) < next_run <= datetime.now(UTC) + timedelta(minutes=15)
    assert next_run.minute % 15 == 0 and next_run.second == 0

    assert detail["connectors"] == [
        {"name": "crm", "used_by": [{"step": "sync", "action": "sync_records", "role": "destination"}]},
        {"name": "events", "used_by": [{"step": "send", "action": "kafka_produce", "role": "connector"}]},
        {"name": "orders-db", "used_by": [{"step": "read", "action": "database_query", "role": "connector"},
                                          {"step": "sync", "action": "sync_records", "role": "source"}]},
    ]  # fmt: skip
    steps = {s["name"]: s for s in detail["definition"]["steps"]}
    assert steps["read"]["input"]["password"] == "***"
    assert steps["call"]["input"]["headers"]["Authorization"] == "***"
    assert "tenant_id" not in detail["definition"] and "version" not in detail["definition"]
    # Sending a masked definition back would store '***' as the password: refused.
    async with env.client() as api:
        r = await api.post("/v1/flows/warehouse/versions", json={**detail["definition"], "id": "warehouse"})
    assert error(r, 422, "validation_error").startswith("steps.0.input")


async def test_pause_refuses_triggers_until_resumed(env: Env) -> None:
    hourly = await create(env, flow_body("pausable", trigger={"type": "schedule", "interval_s": 3600}))
    # Interval ticks sit on a grid from the epoch: the next full hour (UTC), as the scheduler computes it.
    next_hour = datetime.fromisoformat(hourly["schedule"]["next_run_at"])
    assert next_hour.minute == next_hour.second == 0 and timedelta(0) < next_hour - datetime.now(UTC) <= timedelta(
        hours=1
    )
    async with env.client() as api, env.client(service="ingest") as ingest:
        assert (await ingest.post("/v1/flows/pausable/trigger", json={"input": {"n": 1}})).status_code == 202

        r = await api.post("/v1/flows/pausable/pause", json={"reason": "supplier maintenance"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "paused" and r.json()["projected"] is True
        paused = (await api.get("/v1/flows/pausable")).json()
        assert paused["status"] == "paused" and paused["schedule"]["next_run_at"] is None
        assert [f["id"] for f in (await api.get("/v1/flows", params={"status": "paused"})).json()["data"]] == [
            "pausable"
        ]

        refused = await ingest.post("/v1/flows/pausable/trigger", json={"input": {"n": 2}})
        assert "paused" in error(refused, 409, "conflict")
        # Pausing again changes nothing and says so the same way.
        assert (await api.post("/v1/flows/pausable/pause")).json()["status"] == "paused"

        r = await api.post("/v1/flows/pausable/resume")
        assert r.status_code == 200 and r.json()["status"] == "active"
        resumed_next = datetime.fromisoformat(r.json()["schedule"]["next_run_at"])
        assert resumed_next in (next_hour, next_hour + timedelta(hours=1))  # the hour may have turned meanwhile
        accepted = await ingest.post("/v1/flows/pausable/trigger", json={"input": {"n": 3}})
        assert accepted.status_code == 202 and accepted.json()["run_id"].startswith("run_")

        assert (await api.post("/v1/flows/pausable/pause", json={"why": "x"})).status_code == 422
        error(await api.post("/v1/flows/no-such-flow/pause"), 404, "not_found")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": [{"name": "1st step", "action": "transform"}]}, "steps.0.name"),
        ({"steps": [{"name": "fetch", "action": "teleport"}]}, "steps.0.action"),
        ({"steps": []}, "steps"),
        ({"steps": [{"name": "a", "action": "transform"}, {"name": "a", "action": "delay"}]}, "steps"),
        ({"id": "has space"}, "id"),
        ({"colour": "blue"}, "colour"),
        ({"steps": [{"name": "a", "action": "transform", "retries": 3}]}, "steps.0.retries"),
        ({"tenant_id": "tenant-b"}, "tenant_id"),
        ({"version": 7}, "version"),
        ({"trigger": {"type": "schedule", "cron": "every day"}}, "trigger.cron"),
        ({"trigger": {"type": "schedule"}}, "trigger"),
        ({"trigger": {"type": "schedule", "interval_s": 0.5}}, "trigger.interval_s"),
        ({"trigger": {"type": "webhook", "cron": "* * * * *"}}, "trigger"),
        ({"trigger": {"type": "kafka"}}, "trigger.topic"),
        ({"input_schema": {"type": "not-a-type"}}, "input_schema"),
        ({"environment": "STAGING"}, "environment"),
    ],
    ids=lambda p: next(iter(p)) if isinstance(p, dict) else p,
)
async def test_a_bad_definition_gets_422_naming_the_field(env: Env, change: dict[str, Any], field: str) -> None:
    async with env.client() as api:
        r = await api.post("/v1/flows", json={**flow_body("bad-one"), **change})
        assert error(r, 422, "validation_error").startswith(f"{field}:")
        error(await api.get("/v1/flows/bad-one"), 404, "not_found")


async def test_duplicate_ids_environment_tenants_and_scopes(env: Env) -> None:
    await create(env, flow_body("mine"))
    async with env.client() as api:
        assert "already exists" in error(await api.post("/v1/flows", json=flow_body("mine")), 409, "conflict")
        error(await api.post("/v1/flows", content=b"{not json", headers={"Content-Type": "application/json"}),
              400, "invalid_request")  # fmt: skip
    # A test key writes TESTING flows only.
    async with env.client(key="test") as api:
        error(await api.post("/v1/flows", json=flow_body("prod-from-test", environment="PRODUCTION")), 403, "forbidden")
        error(await api.post("/v1/flows/mine/pause"), 404, "not_found")
    # Tenant B neither sees nor changes tenant A's flow, and may use the same id for its own.
    async with env.client(key="other") as api:
        error(await api.get("/v1/flows/mine"), 404, "not_found")
        error(await api.get("/v1/flows/mine/versions/1"), 404, "not_found")
        error(await api.post("/v1/flows/mine/pause"), 404, "not_found")
        error(await api.post("/v1/flows/mine/versions", json=flow_body("mine", "x")), 404, "not_found")
        assert "mine" not in [f["id"] for f in (await api.get("/v1/flows")).json()["data"]]
        assert (await api.post("/v1/flows", json=flow_body("mine", name="B's own"))).status_code == 201
    # A key without flows:write reads flows but cannot change them.
    async with env.client(key="reader") as api:
        assert (await api.get("/v1/flows/mine")).json()["name"] == "Mine"
        assert "flows:write" in error(await api.post("/v1/flows", json=flow_body("nope")), 403, "forbidden")
        error(await api.post("/v1/flows/mine/pause"), 403, "forbidden")
        error(await api.post("/v1/flows/mine/versions", json=flow_body("mine")), 403, "forbidden")
    async with env.client() as api:
        assert (await api.get("/v1/flows/mine")).json()["status"] == "active"
        assert (await api.get("/v1/flows", headers={"Authorization": "Bearer ft_live_nope"})).status_code == 401


async def test_a_write_while_the_projector_is_down_is_accepted_and_shows_once_projected(env: Env) -> None:
    env.stack["projector"].stop()
    try:
        async with env.client() as api:
            r = await api.post("/v1/flows", json=flow_body("while-down"))
            assert r.status_code == 202, r.text
            assert r.json() == {"id": "while-down", "version": 1, "status": "active", "projected": False}
            error(await api.get("/v1/flows/while-down"), 404, "not_found")
            # The topic is the truth: the id is taken even before the read model shows it.
            error(await api.post("/v1/flows", json=flow_body("while-down")), 409, "conflict")
    finally:
        env.stack["projector"].start()
        await env.stack["projector"].wait_healthy()
    async with env.client() as api:

        async def shown() -> bool:
            return (await api.get("/v1/flows/while-down")).status_code == 200

        await wait_until(shown)


# ---------------------------------------------------------------- expressions compiled at publish (issue 12 item 8)


def users_flow(flow_id: str, extract: dict[str, str], **fields: Any) -> dict[str, Any]:
    return {"id": flow_id, "name": "Users", "steps": [
        {"name": "create", "action": "http_request", "input": {"method": "POST", "url": "https://users.example/u"}},
        {"name": "fetch_user", "action": "http_request",
         "input": {"url": "https://users.example/u/{{ vars.user_id }}"}, "extract": extract,
         "assertions": [{"expression": "$.body.id", "expected": "{{ vars.user_id }}"}]},
    ], **fields}  # fmt: skip


async def test_an_expression_that_does_not_compile_is_a_422_naming_the_step_and_the_expression(env: Env) -> None:
    async with env.client() as api:
        r = await api.post("/v1/flows", json=users_flow("bad-paths", {"user_id": "$.user["}))
        assert error(r, 422, "validation_error") == (
            "steps: steps[1] (fetch_user).extract.user_id: invalid JSONPath '$.user[': unexpected end of query"
        )
        error(await api.get("/v1/flows/bad-paths"), 404, "not_found")
        bad_condition = users_flow("bad-paths", {}, steps=[{"name": "a", "action": "transform",
                                                             "run_condition": "vars.[ok"}])  # fmt: skip
        assert error(await api.post("/v1/flows", json=bad_condition), 422, "validation_error").startswith(
            "steps: steps[0] (a).run_condition: invalid JMESPath 'vars.[ok'"
        )
        # The same check on a new version; the flow keeps its valid version 1.
        await create(env, users_flow("good-paths", {"user_id": "$.body.id"}))
        body = users_flow("good-paths", {"user_id": "body.id"})
        body["steps"][0]["input"]["body"] = {"email": "{{ lenght(trigger.email) }}"}
        r = await api.post("/v1/flows/good-paths/versions", json=body)
        assert error(r, 422, "validation_error") == (
            "steps: steps[0] (create).input.body.email: invalid JMESPath 'lenght(trigger.email)': unknown function "
            "lenght()"
        )
        latest = (await api.get("/v1/flows/good-paths")).json()
        assert latest["latest_version"] == 1
        assert latest["definition"]["steps"][1]["extract"] == {"user_id": "$.body.id"}


async def test_a_version_published_before_the_check_still_loads_and_a_new_one_can_follow(env: Env) -> None:
    # Version 1 went to the flows topic before expressions were checked: the API, projector and executor decode
    # it all the same (what the topic holds is the truth), and the flow can be fixed with version 2.
    old = FlowDefinition.model_validate(
        {**users_flow("legacy-paths", {"user_id": "$.user["}), "tenant_id": "tenant-a", "version": 1},
        context=STORED_FLOW,
    )
    published = FlowVersionPublished(tenant_id="tenant-a", flow_id=old.id, flow_version=1, flow=old)
    await publish_flow_events(env.sandbox.infra.kafka_bootstrap, env.sandbox.topics, [published])
    async with env.client() as api:

        async def projected() -> dict[str, Any] | None:
            r = await api.get("/v1/flows/legacy-paths")
            return dict(r.json()) if r.status_code == 200 else None

        shown = await wait_until(projected)
        assert shown["definition"]["steps"][1]["extract"] == {"user_id": "$.user["}
        r = await api.post("/v1/flows/legacy-paths/versions", json=users_flow("legacy-paths", {"user_id": "$.user"}))
        assert r.status_code in (201, 202), r.text
        assert r.json()["version"] == 2
