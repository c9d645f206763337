"""Exact limits with two executors (docs/architecture.md, Admission): a flow's concurrency limit and a tenant's quota
hold over every executor, BLOCKED runs start in the order they were blocked, and an executor killed with -9 mid-load
neither lets a second run in nor strands a blocked one. Runs are spread over four partitions, two per executor.

Each run's active time is its [started_at, finished_at) in the read model; the loopback upstream also counts how many
calls it holds at once, which is what a limit protects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web

from services.executor.engine import ADMISSION_SWEEP_S
from tests.conftest import Infra
from tests.harness import Env, auth, flow, running, stub_upstream, wait_until

LIMIT = 2
QUOTA = 3
OPERATOR_KEY = "ft_op_" + "q" * 43
HOLD_S = 0.6


class Gate:
    """The upstream's /hold: answers after HOLD_S and remembers the most calls it held at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    async def hold(self, request: web.Request) -> web.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(HOLD_S)
        finally:
            self.now -= 1
        return web.json_response({"ok": True})


GATE = Gate()


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with stub_upstream({("POST", "/hold"): GATE.hold}) as upstream:
        call = {"name": "call", "action": "http_request", "retry": {"delays_s": []},
                "input": {"method": "POST", "url": upstream.url + "/hold", "body": {}}}  # fmt: skip
        flows = [
            flow("tenant-a", "limited", [call], concurrency_limit=LIMIT),
            flow("tenant-a", "single", [call], concurrency_limit=1),
            flow("tenant-q", "metered", [call, {"name": "wait", "action": "delay", "input": {"seconds": 3}}]),
            flow("tenant-s", "stored", [call, {"name": "wait", "action": "delay", "input": {"seconds": 3}}]),
        ]  # fmt: skip
        async with running(
            infra, tmp_path_factory, partitions=4, flows=flows,
            keys={"a": "tenant-a", "q": "tenant-q", "s": "tenant-s"},
            env={"FLOWTRAIL_EXECUTOR_TENANT_QUOTAS": f'{{"tenant-q": {QUOTA}}}',
                 "FLOWTRAIL_API_OPERATOR_KEY": OPERATOR_KEY},
            services=("ingest", "api", "projector", "executor"), upstream=upstream,
        ) as env:  # fmt: skip
            second = env.stack.add("executor", "executor-2")
            second.start()
            await second.wait_healthy()
            yield env


def _peak(runs: list[dict[str, Any]]) -> int:
    """The most runs active at once, from their [started_at, finished_at)."""
    edges = sorted(
        [(datetime.fromisoformat(r["started_at"]), 1) for r in runs if r["started_at"]]
        + [(datetime.fromisoformat(r["finished_at"]), -1) for r in runs if r["started_at"]]
    )  # an end sorts before a start at the same instant: they did not overlap
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def _started_by_both(env: Env) -> None:
    """Both executors decided runs of this test (else it proves nothing about two)."""
    for name in ("executor", "executor-2"):
        text = (await env.http.get(env.stack[name].url + "/metrics")).text
        sample = 'flowtrail_executor_triggers_total{outcome="started"}'
        started = [line for line in text.splitlines() if line.startswith(sample)]
        assert started and float(started[0].split()[-1]) > 0, f"{name} started no run"


async def test_a_flow_limit_holds_over_two_executors(env: Env) -> None:
    GATE.most = 0
    ids = await env.trigger_many("limited", [{"n": i} for i in range(12)])
    finals = await env.wait_all(ids, within=120)
    assert set(finals.values()) == {"SUCCEEDED"}, finals
    runs = [await env.run(r) for r in ids]
    assert _peak([r for r in runs if r]) <= LIMIT
    assert GATE.most <= LIMIT, f"the upstream held {GATE.most} calls at once"
    await _started_by_both(env)


async def test_runs_blocked_one_after_another_start_in_that_order_over_two_executors(env: Env) -> None:
    """Limit 1: each run is triggered once the one before it is BLOCKED (or RUNNING), so the order they were blocked
    in is the order they were triggered in; they spread over both executors' partitions."""
    ids = []
    for i in range(6):
        run_id = await env.trigger("single", {"n": i})
        await env.wait_status(run_id, {"BLOCKED", "RUNNING", "SUCCEEDED"})
        ids.append(run_id)
    finals = await env.wait_all(ids, within=120)
    assert set(finals.values()) == {"SUCCEEDED"}, finals
    runs = [r for r in [await env.run(run_id) for run_id in ids] if r]
    starts = [datetime.fromisoformat(r["started_at"]) for r in runs]
    ends = [datetime.fromisoformat(r["finished_at"]) for r in runs]
    assert starts == sorted(starts)  # the order they were blocked in
    assert all(starts[i + 1] >= ends[i] for i in range(len(runs) - 1))  # never two at once
    blocked = [run_id for run_id in ids if "RunBlocked" in await env.event_types(run_id)]
    assert len(blocked) >= 3, "most of them waited BLOCKED"


async def test_a_tenant_quota_holds_over_two_executors(env: Env) -> None:
    GATE.most = 0
    ids = await env.trigger_many("metered", [{"n": i} for i in range(10)], key="q")
    finals = await env.wait_all(ids, key="q", within=120)
    assert sorted(finals.values()) == ["QUOTA_EXCEEDED"] * 7 + ["SUCCEEDED"] * QUOTA, finals
    refused = [await env.run(r, key="q") for r, s in finals.items() if s == "QUOTA_EXCEEDED"]
    assert all(f"quota is {QUOTA}" in (r or {}).get("error_message", "") for r in refused), refused


async def test_the_quota_the_operator_api_stores_with_a_tenant_is_enforced_by_every_executor(env: Env) -> None:
    r = await env.http.patch(env.url("api") + "/v1/admin/tenants/tenant-s", headers=auth(OPERATOR_KEY),
                             json={"quotas": {"max_active_runs": 2}})  # fmt: skip
    assert r.status_code == 200, r.text
    await asyncio.sleep(ADMISSION_SWEEP_S + 1.0)  # each executor reads the stored quotas this often
    ids = await env.trigger_many("stored", [{"n": i} for i in range(6)], key="s")
    finals = await env.wait_all(ids, key="s", within=120)
    assert sorted(finals.values()) == ["QUOTA_EXCEEDED"] * 4 + ["SUCCEEDED"] * 2, finals


async def test_an_executor_killed_mid_load_neither_exceeds_the_limit_nor_strands_a_blocked_run(env: Env) -> None:
    GATE.most = 0
    ids = await env.trigger_many("limited", [{"n": i} for i in range(10)])
    await wait_until(lambda: _any_running(env, ids), 30, "a run RUNNING")
    env.stack["executor-2"].kill()
    finals = await env.wait_all(ids, within=180)
    assert set(finals.values()) == {"SUCCEEDED"}, finals
    runs = [await env.run(r) for r in ids]
    assert _peak([r for r in runs if r]) <= LIMIT
    await env.stack["executor-2"].restart()


async def _any_running(env: Env, ids: list[str]) -> bool:
    for run_id in ids:
        run = await env.run(run_id)
        if run and run["status"] == "RUNNING":
            return True
    return False
