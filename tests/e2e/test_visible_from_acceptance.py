"""A run exists from the moment it is accepted (invariant 9), on real processes.

With no executor running, every run ingest answers 202 for is at once in `GET /v1/runs/{id}` and in the list: QUEUED
(SCHEDULED for `run_at`), `created_at` the accepted time, the trigger shown; `verify` is equal meanwhile. Once an
executor picks them up they finish with the same `created_at`, and `queued_ms` shows the real wait.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import Infra
from tests.harness import TERMINAL, assert_verify_equal, flow, running, wait_until


async def test_an_accepted_run_is_visible_at_once_and_keeps_its_accepted_time(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    echo = flow("t1", "echo", [{"name": "echo", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}],
                name="Echo", tags=["visible"])  # fmt: skip
    # Everything but the executor: accepted runs wait, as in a backlog.
    no_executor = ("ingest", "projector", "api")
    async with running(infra, tmp_path_factory, keys={"t1": "t1"}, flows=[echo], services=no_executor,
                       env={"FLOWTRAIL_INGEST_SCHEDULER": "false"}) as env:  # fmt: skip
        before = datetime.now(UTC)
        one = await env.ingest("POST", "/v1/flows/echo/trigger", json={"input": {"n": 1}})
        assert one.status_code == 202 and one.json()["status"] == "QUEUED", one.text
        run_id = one.json()["run_id"]
        seen = await env.api("GET", f"/v1/runs/{run_id}")  # at once: no waiting, no retry
        assert seen.status_code == 200, seen.text
        run = seen.json()
        assert run["status"] == "QUEUED" and run["flow_id"] == "echo"
        accepted = datetime.fromisoformat(run["created_at"])
        assert before - timedelta(seconds=1) <= accepted <= datetime.now(UTC)
        assert run["trigger"]["payload"] == {"n": 1} and run["trigger"]["type"] == "api"

        batch = await env.trigger_many("echo", [{"n": i} for i in range(50)])
        listed = await env.ok("GET", "/v1/runs", params={"flow_id": "echo", "limit": 100})
        assert {r["id"] for r in listed["data"]} >= {run_id, *batch}
        queued = await env.ok("GET", "/v1/runs", params={"flow_id": "echo", "status": "QUEUED", "limit": 100})
        assert len(queued["data"]) == 51

        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        scheduled = await env.ingest("POST", "/v1/flows/echo/trigger", json={"input": {"n": 2}, "run_at": later})
        assert scheduled.status_code == 202 and scheduled.json()["status"] == "SCHEDULED", scheduled.text
        scheduled_id = scheduled.json()["run_id"]
        assert (await env.ok("GET", f"/v1/runs/{scheduled_id}"))["status"] == "SCHEDULED"

        # Placeholders are not derived from the ledger: verify compares only what it is.
        await assert_verify_equal(env.sandbox)

        await asyncio.sleep(1.0)  # the backlog's wait
        executor = env.stack.add("executor", "executor")
        executor.start()
        await executor.wait_healthy()

        async def final() -> dict[str, object] | None:
            run = await env.ok("GET", f"/v1/runs/{run_id}")
            return dict(run) if run["status"] in TERMINAL else None

        done = await wait_until(final, 60, f"run {run_id} final")
        assert done["status"] == "SUCCEEDED"
        assert datetime.fromisoformat(done["created_at"]) == accepted  # the accepted time, not the pickup
        assert done["duration_breakdown"]["queued_ms"] >= 1000, done["duration_breakdown"]
        assert (await env.ok("GET", f"/v1/runs/{scheduled_id}"))["status"] == "SCHEDULED"
        await assert_verify_equal(env.sandbox)
