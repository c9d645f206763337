"""`q` finds the errors users see (issue 12, item 7), on real processes, the real broker and loopback upstreams.

Tenant A runs a contacts sync whose destination refuses a contact without an email the way NetSuite does
("Please enter value(s) for: Email", a record error of the run), a call to a CRM that answers 401 with an OAuth
error body (the run's error says only "GET … answered 401 Unauthorized"; the body is the step's output) and a run
that succeeds. `q` finds each run by its record error text and by the upstream's body, and nothing else; tenant B,
calling the same CRM, finds its own run and none of A's. Then verify: the live read models equal a replay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Infra
from tests.harness import Env, answer, assert_verify_equal, running, stub_upstream, whole_sync

pytestmark = pytest.mark.e2e

A, B = "search-a", "search-b"
REFUSAL = "Please enter value(s) for: Email"
EXPIRED = {"error": "invalid_token", "error_description": "The access token expired"}


async def _erp(request: web.Request) -> web.Response:
    body = await request.json()
    if not body.get("email"):
        return web.json_response({"title": "Bad Request", "status": 400, "o:errorDetails": [
            {"detail": REFUSAL, "o:errorPath": "email", "o:errorCode": "USER_ERROR"}]}, status=400)  # fmt: skip
    return web.json_response({"id": "erp-1"}, status=201)


ROUTES = {
    ("GET", "/shop/contacts"): answer({"contacts": [{"id": 1, "email": "ada@example.com"}, {"id": 2, "email": None}]}),
    ("POST", "/erp/contacts"): _erp,
    ("GET", "/crm/me"): answer(EXPIRED, 401),
}


def _flows(url: str) -> list[dict[str, Any]]:
    return [
        {"id": "contacts-sync", "name": "Contacts sync", "steps": [
            whole_sync("sync_contacts", f"{url}/shop/contacts", "contacts", f"{url}/erp/contacts", {"email": "email"},
                       entity="contact", system="shop", dest_system="erp")]},
        {"id": "crm-me", "name": "Who am I at the CRM", "steps": [
            {"name": "whoami", "action": "http_request", "retry": {"delays_s": []},
             "input": {"method": "GET", "url": f"{url}/crm/me"}}]},
        {"id": "hello", "name": "Hello", "steps": [
            {"name": "greet", "action": "transform", "input": {"output": {"hello": "world"}}}]},
    ]  # fmt: skip


async def _q(env: Env, tenant: str, text: str) -> set[str]:
    return {r["id"] for r in (await env.ok("GET", "/v1/runs", tenant, params={"q": text, "limit": 100}))["data"]}


async def _workload(env: Env) -> dict[str, str]:
    """Each tenant's flows, one run of each, and the runs by role once they ended."""
    url = env.upstream.url
    for tenant, flows in ((A, _flows(url)), (B, [f for f in _flows(url) if f["id"] == "crm-me"])):
        for flow in flows:
            await env.create_flow(flow, tenant)
    runs = {role: await env.trigger(flow_id, {}, tenant) for role, tenant, flow_id in (
        ("sync", A, "contacts-sync"), ("crm", A, "crm-me"), ("hello", A, "hello"), ("b_crm", B, "crm-me"))}  # fmt: skip
    sync, crm, hello, b_crm = await asyncio.gather(
        *(env.wait_status(runs[role], within=60, key=t) for role, t in
          (("sync", A), ("crm", A), ("hello", A), ("b_crm", B)))
    )  # fmt: skip
    assert (sync["status"], crm["status"], hello["status"], b_crm["status"]) == ("PARTIAL", "FAILED", "SUCCEEDED",
                                                                                   "FAILED")  # fmt: skip
    errors = (await env.ok("GET", f"/v1/runs/{runs['sync']}/record-errors", A))["data"]
    assert [e["error"] for e in errors] == [f"400 Bad Request: {REFUSAL}"]
    # What the issue reports: the run's error names the status only, the body is in the step's output.
    assert "invalid_token" not in crm["error"]["message"] and "401" in crm["error"]["message"]
    return runs


@pytest.fixture(scope="module")
async def world(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Env, dict[str, str]]]:
    async with stub_upstream(ROUTES) as up, running(infra, tmp_path_factory, keys={A: A, B: B}, upstream=up) as env:
        yield env, await _workload(env)


async def test_q_finds_a_record_error_and_the_upstream_401_body(world: tuple[Env, dict[str, str]]) -> None:
    w, runs = world
    assert await _q(w, A, REFUSAL) == {runs["sync"]}
    assert await _q(w, A, "please enter VALUE(s) for: email") == {runs["sync"]}  # any case
    assert await _q(w, A, "o:errorCode: USER_ERROR") == {runs["sync"]}  # the destination's raw error
    assert await _q(w, A, "The access token expired") == {runs["crm"]}  # the upstream's 401 body
    assert await _q(w, A, "invalid_token") == {runs["crm"]}
    assert await _q(w, A, "answered 401 Unauthorized") == {runs["crm"]}  # the run's error message, as before
    assert await _q(w, A, runs["hello"][-12:]) == {runs["hello"]}  # a fragment of the run id, as before
    assert await _q(w, A, "no run says this") == set()
    # q is scoped by the key's tenant: B called the same CRM and finds its own run, never A's.
    assert await _q(w, B, "The access token expired") == {runs["b_crm"]}
    assert await _q(w, B, REFUSAL) == set()
    assert await _q(w, B, runs["sync"]) == set()


async def test_the_search_text_equals_a_replay_of_the_ledger(world: tuple[Env, dict[str, str]]) -> None:
    env, runs = world
    await assert_verify_equal(env.sandbox)
    conn = await env.db()
    try:
        texts = dict(await conn.fetch("SELECT id, search_details FROM runs WHERE search_details IS NOT NULL"))
    finally:
        await conn.close()
    assert set(texts) == {runs["sync"], runs["crm"], runs["b_crm"]}
    assert "error_description: The access token expired" in texts[runs["crm"]]
