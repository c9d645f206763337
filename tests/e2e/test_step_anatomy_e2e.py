"""Honest step anatomy on real processes and the real broker (issue 12, item 6): a run whose first step is answered
503 then 200, whose second step is skipped by its run_condition and whose last step runs, ends SUCCEEDED and shows
everything it did — each attempt's answer (the 503's body too), the skipped step's action, masked input and reason,
and an INFO log line for every step start, success and skip — and a rebuild from the ledger equals the live tables.

Time runs 100 times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01): the 1 s backoff takes 10 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port

TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}
CONDITION = "steps.fetch.output.body.total > `100`"


@dataclass
class Env:
    sandbox: Sandbox
    stack: Stack
    upstream: str
    key: str
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    async def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.request(method, self.stack["api"].url + path,
                                        headers={"Authorization": f"Bearer {self.key}"}, **kwargs)  # fmt: skip

    async def trigger(self, payload: Any) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(f"{self.stack['ingest'].url}/v1/flows/anatomy/trigger", json={"input": payload},
                                  headers={"Authorization": f"Bearer {self.key}"})  # fmt: skip
        assert r.status_code == 202, r.text
        return str(r.json()["run_id"])

    async def wait(self, run_id: str, within: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            r = await self.api("GET", f"/v1/runs/{run_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                return dict(r.json())
            assert time.monotonic() < deadline, f"{run_id} not final: {r.text}\n{self.stack['executor'].log_tail()}"
            await asyncio.sleep(0.05)


async def _upstream(calls: dict[str, list[int]]) -> tuple[web.AppRunner, str]:
    async def order(request: web.Request) -> web.Response:
        seen = calls[request.path]
        if not seen:  # the first read is refused: the step's first attempt
            seen.append(503)
            return web.json_response({"error": "order service warming up"}, status=503)
        seen.append(200)
        return web.json_response({"id": request.match_info["id"], "total": 40})

    async def notify(request: web.Request) -> web.Response:
        calls[request.path].append(200)
        return web.json_response({"sent": True})

    app = web.Application()
    app.router.add_get("/orders/{id}", order)
    app.router.add_post("/notify", notify)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def _flow(upstream: str) -> FlowDefinition:
    return FlowDefinition.model_validate({"tenant_id": "tenant-a", "id": "anatomy", "name": "Anatomy", "version": 1,
        "steps": [
            {"name": "fetch", "action": "http_request",
             "input": {"method": "GET", "url": upstream + "/orders/{{ trigger.order_id }}"}},
            {"name": "notify", "action": "http_request", "run_condition": CONDITION,
             "input": {"method": "POST", "url": upstream + "/notify",
                       "body": {"total": "{{ steps.fetch.output.body.total }}", "token": "{{ trigger.token }}"}}},
            {"name": "shape", "action": "transform",
             "input": {"output": {"order": "{{ steps.fetch.output.body.id }}"}}},
        ]})  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        calls: dict[str, list[int]] = defaultdict(list)
        runner, upstream = await _upstream(calls)
        conn = await connect(infra.database_url, sandbox.schema)
        try:
            await ensure_tenant(conn, "tenant-a", "A")
            _, key = await create_api_key(conn, "tenant-a")
        finally:
            await conn.close()
        flow = _flow(upstream)
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [
            FlowVersionPublished(tenant_id=flow.tenant_id, flow_id=flow.id, flow_version=1, flow=flow)
        ])  # fmt: skip
        stack = Stack.build(
            sandbox,
            ("ingest", "executor", "projector", "api"),
            tmp_path_factory.mktemp("logs"),
            FLOWTRAIL_EXECUTOR_TIME_SCALE="0.01",
            FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS="true",
            FLOWTRAIL_INGEST_SCHEDULER="false",
        )
        await stack.start()
        try:
            conn = await connect(infra.database_url, sandbox.schema)
            try:
                deadline = time.monotonic() + 30
                while await conn.fetchval("SELECT count(*) FROM flows") < 1:
                    assert time.monotonic() < deadline, "flow not projected"
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
            yield Env(sandbox, stack, upstream, key, calls)
        finally:
            stack.stop()
            await runner.cleanup()


async def test_a_run_shows_every_attempts_answer_its_skipped_step_and_a_readable_log(env: Env) -> None:
    run = await env.wait(await env.trigger({"order_id": "SO-7", "token": "tok-secret-1"}))
    assert run["status"] == "SUCCEEDED", run
    assert env.calls["/orders/SO-7"] == [503, 200] and "/notify" not in env.calls
    fetch, notify, shape = run["steps"]

    # Each attempt keeps what the upstream answered: the 503's status and body, then the 200's.
    assert (fetch["status"], fetch["attempt"]) == ("SUCCEEDED", 2)
    first, second = fetch["attempts"]
    assert (first["status"], first["error"]["category"], first["error"]["status_code"]) == ("FAILED", "TRANSIENT", 503)
    assert first["output"]["status"] == 503 and first["output"]["body"] == {"error": "order service warming up"}
    assert first["output"]["request"]["url"] == env.upstream + "/orders/SO-7"
    assert second["status"] == "SUCCEEDED" and second["output"]["body"] == {"id": "SO-7", "total": 40}
    assert second["output"] == fetch["output"]

    # The skipped step: what it would have done (input rendered, secrets masked) and why it did not run.
    assert (notify["name"], notify["status"], notify["action"]) == ("notify", "SKIPPED", "http_request")
    assert notify["input"] == {"method": "POST", "url": env.upstream + "/notify",
                               "body": {"total": 40, "token": "***"}}  # fmt: skip
    assert notify["reason"] == f'run_condition "{CONDITION}" was false'
    assert notify["attempts"] == [] and notify["output"] is None
    assert shape["status"] == "SUCCEEDED" and shape["output"] == {"order": "SO-7"}

    # Its log: the executor's retry WARNING among an INFO line per step start, success and skip, in seq order.
    logs = (await env.api("GET", f"/v1/runs/{run['id']}/logs")).json()["data"]
    assert [e["seq"] for e in logs] == sorted(e["seq"] for e in logs)
    lines = [(e["level"], e["step"], e["message"]) for e in logs]
    assert lines[0] == ("INFO", "fetch", "step fetch started (http_request, attempt 1)")
    assert lines[1][:2] == ("WARNING", "fetch") and lines[1][2].startswith("attempt 1 failed (TRANSIENT)")
    assert lines[2] == ("INFO", "fetch", "step fetch started (http_request, attempt 2)")
    assert lines[3][:2] == ("INFO", "fetch") and lines[3][2].startswith("step fetch succeeded in ")
    assert lines[3][2].endswith(" ms (attempt 2)") and logs[3]["fields"]["attempt"] == 2
    assert lines[4] == ("INFO", "notify", f'step notify skipped: run_condition "{CONDITION}" was false')
    assert lines[5] == ("INFO", "shape", "step shape started (transform, attempt 1)")
    assert lines[6][:2] == ("INFO", "shape") and lines[6][2].startswith("step shape succeeded in ")
    assert len(lines) == 7
    warnings = (await env.api("GET", f"/v1/runs/{run['id']}/logs", params={"level": "WARNING"})).json()["data"]
    assert [e["level"] for e in warnings] == ["WARNING"]
    # No ledger event per log line: the ledger holds the step events only (and the executor's one WARNING).
    events = (await env.api("GET", f"/v1/runs/{run['id']}/events")).json()["data"]
    assert [e["type"] for e in events].count("LogEmitted") == 1

    # As of the retry's wait, the first attempt already shows its answer.
    waiting = next(e["seq"] for e in events if e["type"] == "StepAttemptFailed")
    then = (await env.api("GET", f"/v1/runs/{run['id']}", params={"as_of": str(waiting)})).json()
    assert then["steps"][0]["attempts"][0]["output"]["status"] == 503

    # A rebuild from the ledger equals the live read models (`flowtrail projector verify`).
    settings = ProjectorSettings(
        kafka_bootstrap=env.sandbox.infra.kafka_bootstrap,
        database_url=env.sandbox.infra.database_url,
        database_schema=env.sandbox.schema,
        topic_prefix=env.sandbox.topics.prefix,
    )
    progress: list[str] = []
    outcome = await rebuild.run(settings, swap=False, progress=progress.append)
    assert outcome.comparison.equal, (outcome.comparison.differing_tables, progress)
