"""`q` finds the errors users see (issue 12, item 7), on real processes, the real broker and loopback upstreams.

Tenant A runs a contacts sync whose destination refuses a contact without an email the way NetSuite does
("Please enter value(s) for: Email", a record error of the run), a call to a CRM that answers 401 with an OAuth
error body (the run's error says only "GET … answered 401 Unauthorized"; the body is the step's output) and a run
that succeeds. `q` finds each run by its record error text and by the upstream's body, and nothing else; tenant B,
calling the same CRM, finds its own run and none of A's. Then verify: the live read models equal a replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web

from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port

pytestmark = pytest.mark.e2e

A, B = "search-a", "search-b"
TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}
REFUSAL = "Please enter value(s) for: Email"
EXPIRED = {"error": "invalid_token", "error_description": "The access token expired"}


async def _upstream() -> tuple[web.AppRunner, str]:
    async def contacts(request: web.Request) -> web.Response:
        return web.json_response({"contacts": [{"id": 1, "email": "ada@example.com"}, {"id": 2, "email": None}]})

    async def erp(request: web.Request) -> web.Response:
        body = await request.json()
        if not body.get("email"):
            return web.json_response({"title": "Bad Request", "status": 400, "o:errorDetails": [
                {"detail": REFUSAL, "o:errorPath": "email", "o:errorCode": "USER_ERROR"}]}, status=400)  # fmt: skip
        return web.json_response({"id": "erp-1"}, status=201)

    async def me(request: web.Request) -> web.Response:
        return web.json_response(EXPIRED, status=401)

    app = web.Application()
    app.router.add_get("/shop/contacts", contacts)
    app.router.add_post("/erp/contacts", erp)
    app.router.add_get("/crm/me", me)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _flows(url: str) -> list[dict[str, Any]]:
    return [
        {"id": "contacts-sync", "name": "Contacts sync", "steps": [
            {"name": "sync_contacts", "action": "sync_records", "retry": {"delays_s": []}, "input": {
                "source": {"kind": "http", "url": f"{url}/shop/contacts", "records_path": "contacts",
                           "updated_since_param": None, "updated_until_param": None},
                "destination": {"kind": "http", "url": f"{url}/erp/contacts"},
                "key": "id", "mapping": {"email": "email"}, "entity": "contact", "system": "shop",
                "dest_system": "erp"}}]},
        {"id": "crm-me", "name": "Who am I at the CRM", "steps": [
            {"name": "whoami", "action": "http_request", "retry": {"delays_s": []},
             "input": {"method": "GET", "url": f"{url}/crm/me"}}]},
        {"id": "hello", "name": "Hello", "steps": [
            {"name": "greet", "action": "transform", "input": {"output": {"hello": "world"}}}]},
    ]  # fmt: skip


@dataclass
class World:
    sandbox: Sandbox
    stack: Stack
    client: httpx.AsyncClient
    keys: dict[str, str]
    runs: dict[str, str]  # role → run id

    async def get(self, tenant: str, path: str, **params: Any) -> Any:
        r = await self.client.get(self.stack["api"].url + path, params=params,
                                  headers={"Authorization": f"Bearer {self.keys[tenant]}"})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()

    async def q(self, tenant: str, text: str) -> set[str]:
        return {r["id"] for r in (await self.get(tenant, "/v1/runs", q=text, limit=100))["data"]}


async def _until(what: str, check: Any, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    while not (got := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return got


async def _workload(w: World, url: str) -> None:
    api, ingest = w.stack["api"].url, w.stack["ingest"].url
    for tenant, flows in ((A, _flows(url)), (B, [f for f in _flows(url) if f["id"] == "crm-me"])):
        auth = {"Authorization": f"Bearer {w.keys[tenant]}"}
        for flow in flows:
            r = await w.client.post(f"{api}/v1/flows", json=flow, headers=auth)
            assert r.status_code in (201, 202), r.text

            async def projected(flow_id: str = flow["id"], headers: dict[str, str] = auth) -> bool:
                return (await w.client.get(f"{api}/v1/flows/{flow_id}", headers=headers)).status_code == 200

            await _until(f"flow {flow['id']} of {tenant}", projected)
    for role, tenant, flow_id in (("sync", A, "contacts-sync"), ("crm", A, "crm-me"), ("hello", A, "hello"),
                                  ("b_crm", B, "crm-me")):  # fmt: skip
        r = await w.client.post(f"{ingest}/v1/flows/{flow_id}/trigger", json={"input": {}},
                                headers={"Authorization": f"Bearer {w.keys[tenant]}"})  # fmt: skip
        assert r.status_code == 202, r.text
        w.runs[role] = r.json()["run_id"]

    async def finished(role: str, tenant: str) -> dict[str, Any] | None:
        run = await w.get(tenant, f"/v1/runs/{w.runs[role]}")
        return run if run["status"] in TERMINAL else None

    sync, crm, hello, b_crm = await asyncio.gather(
        *(_until(role, lambda role=role, t=t: finished(role, t)) for role, t in
          (("sync", A), ("crm", A), ("hello", A), ("b_crm", B)))
    )  # fmt: skip
    assert (sync["status"], crm["status"], hello["status"], b_crm["status"]) == ("PARTIAL", "FAILED", "SUCCEEDED",
                                                                                   "FAILED")  # fmt: skip
    errors = (await w.get(A, f"/v1/runs/{w.runs['sync']}/record-errors"))["data"]
    assert [e["error"] for e in errors] == [f"400 Bad Request: {REFUSAL}"]
    # What the issue reports: the run's error names the status only, the body is in the step's output.
    assert "invalid_token" not in crm["error"]["message"] and "401" in crm["error"]["message"]


@pytest.fixture(scope="module")
async def world(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with make_sandbox(infra) as sandbox:
        runner, url = await _upstream()
        conn = await connect(infra.database_url, sandbox.schema)
        try:
            keys = {}
            for tenant in (A, B):
                await ensure_tenant(conn, tenant, tenant)
                _, keys[tenant] = await create_api_key(conn, tenant)
        finally:
            await conn.close()
        stack = Stack.build(sandbox, ("ingest", "executor", "projector", "api"), tmp_path_factory.mktemp("logs"))
        await stack.start()
        client = httpx.AsyncClient(timeout=20)
        try:
            w = World(sandbox, stack, client, keys, {})
            await _workload(w, url)
            yield w
        finally:
            await client.aclose()
            stack.stop()
            await runner.cleanup()


async def test_q_finds_a_record_error_and_the_upstream_401_body(world: World) -> None:
    w, runs = world, world.runs
    assert await w.q(A, REFUSAL) == {runs["sync"]}
    assert await w.q(A, "please enter VALUE(s) for: email") == {runs["sync"]}  # any case
    assert await w.q(A, "o:errorCode: USER_ERROR") == {runs["sync"]}  # the destination's raw error
    assert await w.q(A, "The access token expired") == {runs["crm"]}  # the upstream's 401 body
    assert await w.q(A, "invalid_token") == {runs["crm"]}
    assert await w.q(A, "answered 401 Unauthorized") == {runs["crm"]}  # the run's error message, as before
    assert await w.q(A, runs["hello"][-12:]) == {runs["hello"]}  # a fragment of the run id, as before
    assert await w.q(A, "no run says this") == set()
    # q is scoped by the key's tenant: B called the same CRM and finds its own run, never A's.
    assert await w.q(B, "The access token expired") == {runs["b_crm"]}
    assert await w.q(B, REFUSAL) == set()
    assert await w.q(B, runs["sync"]) == set()


async def test_the_search_text_equals_a_replay_of_the_ledger(world: World) -> None:
    box = world.sandbox
    settings = ProjectorSettings(kafka_bootstrap=box.infra.kafka_bootstrap, database_url=box.infra.database_url,
                                 database_schema=box.schema, topic_prefix=box.topics.prefix)  # fmt: skip
    outcome = await rebuild.run(settings, swap=False, progress=lambda line: None)
    assert outcome.comparison.equal, rebuild.describe(outcome.comparison)
    conn = await connect(box.infra.database_url, box.schema)
    try:
        texts = dict(await conn.fetch("SELECT id, search_details FROM runs WHERE search_details IS NOT NULL"))
    finally:
        await conn.close()
    assert set(texts) == {world.runs["sync"], world.runs["crm"], world.runs["b_crm"]}
    assert "error_description: The access token expired" in texts[world.runs["crm"]]
