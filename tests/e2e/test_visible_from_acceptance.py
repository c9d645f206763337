"""A run exists from the moment it is accepted (invariant 9), on real processes.

With no executor running, every run ingest answers 202 for is at once in `GET /v1/runs/{id}` and in the list: QUEUED
(SCHEDULED for `run_at`), `created_at` the accepted time, the trigger shown; `verify` is equal meanwhile. Once an
executor picks them up they finish with the same `created_at`, and `queued_ms` shows the real wait.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Sandbox
from tests.e2e.stack import Service, Stack, free_port

TERMINAL = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED", "INTERNAL_ERROR"}


def _verify_settings(sandbox: Sandbox) -> ProjectorSettings:
    return ProjectorSettings(kafka_bootstrap=sandbox.infra.kafka_bootstrap, database_url=sandbox.infra.database_url,
                             database_schema=sandbox.schema, topic_prefix=sandbox.topics.prefix)  # fmt: skip


async def test_an_accepted_run_is_visible_at_once_and_keeps_its_accepted_time(sandbox: Sandbox, tmp_path: Path) -> None:
    conn = await connect(sandbox.infra.database_url, sandbox.schema)
    try:
        await ensure_tenant(conn, "t1", "T1")
        key = (await create_api_key(conn, "t1"))[1]
    finally:
        await conn.close()
    flow = FlowDefinition.model_validate({"tenant_id": "t1", "version": 1, "id": "echo", "name": "Echo",
                                          "tags": ["visible"], "steps": [
        {"name": "echo", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}]})  # fmt: skip
    published = FlowVersionPublished(tenant_id="t1", flow_id="echo", flow_version=1, flow=flow)
    await publish_flow_events(sandbox.infra.kafka_bootstrap, sandbox.topics, [published])
    # Everything but the executor: accepted runs wait, as in a backlog.
    stack = Stack.build(sandbox, ("ingest", "projector", "api"), tmp_path, FLOWTRAIL_INGEST_SCHEDULER="false")
    executor = Service("executor", free_port(), {}, tmp_path / "executor.log")  # started later
    await stack.start()
    auth = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(timeout=30, headers=auth) as client:
            ingest, api = stack["ingest"].url, stack["api"].url
            deadline = time.monotonic() + 30
            while (await client.get(f"{api}/v1/flows/echo")).status_code != 200:
                assert time.monotonic() < deadline, "flow not projected"
                await asyncio.sleep(0.05)

            before = datetime.now(UTC)
            one = await client.post(f"{ingest}/v1/flows/echo/trigger", json={"input": {"n": 1}})
            assert one.status_code == 202 and one.json()["status"] == "QUEUED", one.text
            run_id = one.json()["run_id"]
            seen = await client.get(f"{api}/v1/runs/{run_id}")  # at once: no waiting, no retry
            assert seen.status_code == 200, seen.text
            run = seen.json()
            assert run["status"] == "QUEUED" and run["flow_id"] == "echo"
            accepted = datetime.fromisoformat(run["created_at"])
            assert before - timedelta(seconds=1) <= accepted <= datetime.now(UTC)
            assert run["trigger"]["payload"] == {"n": 1} and run["trigger"]["type"] == "api"

            batch = await client.post(f"{ingest}/v1/flows/echo/trigger", json={"inputs": [{"n": i} for i in range(50)]})
            assert batch.status_code == 202
            listed = await client.get(f"{api}/v1/runs", params={"flow_id": "echo", "limit": 100})
            assert {r["id"] for r in listed.json()["data"]} >= {run_id, *batch.json()["run_ids"]}
            queued = await client.get(f"{api}/v1/runs", params={"flow_id": "echo", "status": "QUEUED", "limit": 100})
            assert len(queued.json()["data"]) == 51

            later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
            scheduled = await client.post(f"{ingest}/v1/flows/echo/trigger", json={"input": {"n": 2}, "run_at": later})
            assert scheduled.status_code == 202 and scheduled.json()["status"] == "SCHEDULED", scheduled.text
            shown = (await client.get(f"{api}/v1/runs/{scheduled.json()['run_id']}")).json()
            assert shown["status"] == "SCHEDULED"

            # Placeholders are not derived from the ledger: verify compares only what it is.
            assert (await rebuild.run(_verify_settings(sandbox), swap=False, progress=lambda _: None)).comparison.equal

            await asyncio.sleep(1.0)  # the backlog's wait
            executor = Service("executor", free_port(), {**stack["ingest"].env}, tmp_path / "executor.log")
            executor.env["FLOWTRAIL_EXECUTOR_WEB_PORT"] = str(executor.port)
            executor.start()
            await executor.wait_healthy()
            deadline = time.monotonic() + 60
            while True:
                final = (await client.get(f"{api}/v1/runs/{run_id}")).json()
                if final["status"] in TERMINAL:
                    break
                assert time.monotonic() < deadline, final
                await asyncio.sleep(0.05)
            assert final["status"] == "SUCCEEDED"
            assert datetime.fromisoformat(final["created_at"]) == accepted  # the accepted time, not the pickup
            assert final["duration_breakdown"]["queued_ms"] >= 1000, final["duration_breakdown"]
            assert (await client.get(f"{api}/v1/runs/{scheduled.json()['run_id']}")).json()["status"] == "SCHEDULED"
        outcome = await rebuild.run(_verify_settings(sandbox), swap=False, progress=lambda _: None)
        assert outcome.comparison.equal, outcome.comparison
    finally:
        executor.stop()
        stack.stop()
