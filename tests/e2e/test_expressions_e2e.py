"""Expressions on real processes (issue 12 item 8): a flow published through the API whose JSONPath extraction
(`$.body.user.id`, wildcards, recursive descent) feeds a later step and whose templated assertion `expected` compares
with the extracted value; a version published before expressions were checked still loads in the executor and fails
only its own run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from schemas.flows import STORED_FLOW, FlowDefinition
from tests.conftest import Infra
from tests.harness import Env, running, stub_upstream

USERS: dict[str, dict[str, Any]] = {}


async def _create(request: web.Request) -> web.Response:
    """A loopback users API: POST creates a user (email stored lower-cased), GET reads it back."""
    body = await request.json()
    user_id = f"u-{len(USERS) + 1}"
    user = {"id": user_id, "email": str(body["email"]).lower(), "roles": [{"name": "dev"}, {"name": "ops"}]}
    USERS[user_id] = user
    return web.json_response({"user": user, "links": [{"rel": "self", "href": f"/users/{user_id}"}]}, status=201)


async def _read(request: web.Request) -> web.Response:
    user = USERS.get(request.match_info["id"])
    return web.json_response(user or {"error": "no such user"}, status=200 if user else 404)


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
    # Published before expressions were checked: `$.user[` does not compile, and is on the topic all the same.
    legacy = FlowDefinition.model_validate({
        "id": "legacy", "name": "Legacy", "tenant_id": "tenant-a", "version": 1, "steps": [
            {"name": "shape", "action": "transform", "input": {"output": {"user": {"id": 7}}},
             "extract": {"user_id": "$.user["}},
        ]}, context=STORED_FLOW)  # fmt: skip
    routes = {("POST", "/users"): _create, ("GET", "/users/{id}"): _read}
    async with stub_upstream(routes) as up, running(infra, tmp_path_factory, flows=[legacy], upstream=up) as env:
        yield env


async def test_a_jsonpath_extraction_feeds_the_next_step_and_a_templated_expected_passes(env: Env) -> None:
    await env.create_flow(_create_then_fetch(env.upstream.url))
    run = await env.wait_status(await env.trigger("create-then-fetch", {"email": "ada@example.com"}))

    assert run["status"] == "SUCCEEDED", run
    create, fetch = run["steps"]
    user_id = create["output"]["body"]["user"]["id"]
    # One node: its value (even from a wildcard over a one-link list); several: a list.
    assert create["extractions"] == {"user_id": user_id, "hrefs": f"/users/{user_id}", "roles": ["dev", "ops"]}
    assert fetch["input"]["url"] == f"{env.upstream.url}/users/{user_id}"
    assert [(a["expression"], a["expected"], a["actual"], a["passed"]) for a in fetch["assertions"]] == [
        ("$.body.id", user_id, user_id, True),
        ("body.email", "ada@example.com", "ada@example.com", True),
    ]


async def test_a_templated_expected_that_differs_fails_the_step_showing_what_it_compared(env: Env) -> None:
    await env.create_flow({**_create_then_fetch(env.upstream.url), "id": "create-then-fetch-2"})
    run = await env.wait_status(await env.trigger("create-then-fetch-2", {"email": "Grace@Example.com"}))

    assert run["status"] == "FAILED" and run["failed_step"] == "fetch_user"
    fetch = run["steps"][1]
    assert fetch["error"]["code"] == "assertion_failed"
    assert [(a["expected"], a["actual"], a["passed"]) for a in fetch["assertions"]][1] == (
        "Grace@Example.com", "grace@example.com", False
    )  # fmt: skip


async def test_a_version_published_before_the_check_loads_and_fails_only_its_own_run(env: Env) -> None:
    run = await env.wait_status(await env.trigger("legacy", {}))
    assert run["status"] == "FAILED" and run["failed_step"] == "shape"
    error = run["steps"][0]["error"]
    assert error["code"] == "extraction_failed" and "$.user[" in error["message"]
