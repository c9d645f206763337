"""Expressions on real processes (issue 12 item 8): a flow published through the API whose JSONPath extraction (seed
004's syntax) feeds a later step and whose templated assertion `expected` compares with the extracted value; a
version published before expressions were checked still loads in the executor and fails only its own run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from schemas.events import FlowVersionPublished
from schemas.flows import STORED_FLOW, FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from tests.conftest import Infra, make_sandbox
from tests.e2e.stack import Stack, free_port
from tests.e2e.test_core_loop import Env, trigger, wait_final


async def _users_api() -> tuple[web.AppRunner, str]:
    """A loopback users API: POST creates a user (email stored lower-cased), GET reads it back."""
    users: dict[str, dict[str, Any]] = {}

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        user_id = f"u-{len(users) + 1}"
        user = {"id": user_id, "email": str(body["email"]).lower(), "roles": [{"name": "dev"}, {"name": "ops"}]}
        users[user_id] = user
        return web.json_response({"user": user, "links": [{"rel": "self", "href": f"/users/{user_id}"}]},
                                 status=201)  # fmt: skip

    async def read(request: web.Request) -> web.Response:
        user = users.get(request.match_info["id"])
        return web.json_response(user or {"error": "no such user"}, status=200 if user else 404)

    app = web.Application()
    app.router.add_post("/users", create)
    app.router.add_get("/users/{id}", read)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _create_then_fetch(upstream: str) -> dict[str, Any]:
    return {
        "id": "create-then-fetch", "name": "Create user then fetch it", "steps": [
            {"name": "create_user", "action": "http_request",
             "input": {"method": "POST", "url": upstream + "/users", "body": {"email": "{{ trigger.email }}"}},
             "assertions": [{"expression": "$.status", "expected": 201}],
             "extract": {"user_id": "$.body.user.id", "hrefs": "$.body.links[*].href", "roles": "$..roles[*].name"}},
            {"name": "fetch_user", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/users/{{ vars.user_id }}"},
             "assertions": [{"expression": "$.body.id", "expected": "{{ vars.user_id }}"},
                            {"expression": "body.email", "expected": "{{ trigger.email }}"}]},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        runner, upstream = await _users_api()
        conn = await connect(infra.database_url, sandbox.schema)
        try:
            await ensure_tenant(conn, "tenant-a", "A")
            _, key = await create_api_key(conn, "tenant-a")
        finally:
            await conn.close()
        # Published before expressions were checked: `$.user[` does not compile, and is on the topic all the same.
        legacy = FlowDefinition.model_validate({
            "id": "legacy", "name": "Legacy", "tenant_id": "tenant-a", "version": 1, "steps": [
                {"name": "shape", "action": "transform", "input": {"output": {"user": {"id": 7}}},
                 "extract": {"user_id": "$.user["}},
            ]}, context=STORED_FLOW)  # fmt: skip
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [
            FlowVersionPublished(tenant_id="tenant-a", flow_id="legacy", flow_version=1, flow=legacy)
        ])  # fmt: skip
        stack = Stack.build(sandbox, ("ingest", "executor", "projector", "api"), tmp_path_factory.mktemp("logs"))
        await stack.start()
        try:
            yield Env(sandbox, stack, upstream, key, key)
        finally:
            stack.stop()
            await runner.cleanup()


async def _publish(env: Env, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=env.api, timeout=15, headers={"Authorization": f"Bearer {env.key_a}"}) as api:
        r = await api.post("/v1/flows", json=body)
        assert r.status_code in (201, 202), r.text
        deadline = time.monotonic() + 30
        while (await api.get(f"/v1/flows/{body['id']}")).status_code != 200:
            assert time.monotonic() < deadline, "flow not projected"
            await asyncio.sleep(0.05)


async def test_a_jsonpath_extraction_feeds_the_next_step_and_a_templated_expected_passes(env: Env) -> None:
    await _publish(env, _create_then_fetch(env.upstream))
    run = await wait_final(env, await trigger(env, "create-then-fetch", {"email": "ada@example.com"}))

    assert run["status"] == "SUCCEEDED", run
    create, fetch = run["steps"]
    user_id = create["output"]["body"]["user"]["id"]
    # One node: its value (even from a wildcard over a one-link list); several: a list.
    assert create["extractions"] == {"user_id": user_id, "hrefs": f"/users/{user_id}", "roles": ["dev", "ops"]}
    assert fetch["input"]["url"] == f"{env.upstream}/users/{user_id}"
    assert [(a["expression"], a["expected"], a["actual"], a["passed"]) for a in fetch["assertions"]] == [
        ("$.body.id", user_id, user_id, True),
        ("body.email", "ada@example.com", "ada@example.com", True),
    ]


async def test_a_templated_expected_that_differs_fails_the_step_showing_what_it_compared(env: Env) -> None:
    await _publish(env, {**_create_then_fetch(env.upstream), "id": "create-then-fetch-2"})
    run = await wait_final(env, await trigger(env, "create-then-fetch-2", {"email": "Grace@Example.com"}))

    assert run["status"] == "FAILED" and run["failed_step"] == "fetch_user"
    fetch = run["steps"][1]
    assert fetch["error"]["code"] == "assertion_failed"
    assert [(a["expected"], a["actual"], a["passed"]) for a in fetch["assertions"]][1] == (
        "Grace@Example.com", "grace@example.com", False
    )  # fmt: skip


async def test_a_version_published_before_the_check_loads_and_fails_only_its_own_run(env: Env) -> None:
    run = await wait_final(env, await trigger(env, "legacy", {}))
    assert run["status"] == "FAILED" and run["failed_step"] == "shape"
    error = run["steps"][0]["error"]
    assert error["code"] == "extraction_failed" and "$.user[" in error["message"]
