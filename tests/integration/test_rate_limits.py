"""Rate limits on real processes (seed 003): a burst admits exactly the limit of its class (reads, writes, triggers)
and the rest get 429 with Retry-After; two API processes share one key's budget; budgets are per key and per class;
every authenticated answer carries the X-RateLimit-* headers; a refused client is let in when Retry-After says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import httpx
import pytest

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack

READS, WRITES, TRIGGERS = 20, 5, 3
LIMITS = {
    "FLOWTRAIL_API_RATE_LIMIT_READS": str(READS), "FLOWTRAIL_API_RATE_LIMIT_WRITES": str(WRITES),
    "FLOWTRAIL_INGEST_RATE_LIMIT_READS": str(READS), "FLOWTRAIL_INGEST_RATE_LIMIT_TRIGGERS": str(TRIGGERS),
}  # fmt: skip
# A third API process with a 2-second window, to see a refused client let in again without waiting a minute.
SHORT = {"FLOWTRAIL_API_RATE_LIMIT_READS": "3", "FLOWTRAIL_API_RATE_LIMIT_WINDOW_S": "2"}


@dataclass
class Env:
    sandbox: Sandbox
    api1: str
    api2: str
    ingest: str
    short: str

    async def key(self, scopes: tuple[str, ...] = ("runs:read", "runs:write", "admin")) -> str:
        """A fresh key: each test starts with full budgets."""
        db = await connect(self.sandbox.infra.database_url, self.sandbox.schema)
        try:
            return (await create_api_key(db, "t1", scopes=scopes))[1]
        finally:
            await db.close()


def _client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=20, headers={"Authorization": f"Bearer {key}"})


def _assert_burst(answers: list[httpx.Response], limit: int, ok: int) -> None:
    """Exactly `limit` admitted, counting down to 0; the rest refused with Retry-After and the envelope."""
    admitted = [r for r in answers if r.status_code == ok]
    refused = [r for r in answers if r.status_code == 429]
    assert len(admitted) == limit and len(refused) == len(answers) - limit, [r.status_code for r in answers]
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted) == list(range(limit))
    now = time.time()
    for r in answers:
        assert r.headers["X-RateLimit-Limit"] == str(limit)
        assert now - 1 <= int(r.headers["X-RateLimit-Reset"]) <= now + 121  # unix seconds, as in seed 003
    for r in refused:
        assert r.headers["X-RateLimit-Remaining"] == "0" and 1 <= int(r.headers["Retry-After"]) <= 120
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and "retry after" in error["message"] and error["request_id"]


async def _burst(requests: list[Awaitable[httpx.Response]]) -> list[httpx.Response]:
    return list(await asyncio.gather(*requests))


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with make_sandbox(infra) as sandbox:
        db = await connect(infra.database_url, sandbox.schema)
        try:
            await ensure_tenant(db, "t1", "T1")
        finally:
            await db.close()
        flow = FlowDefinition.model_validate({"tenant_id": "t1", "id": "f1", "name": "F1", "version": 1, "steps": [
            {"name": "shape", "action": "transform", "input": {"output": {"ok": True}}}]})  # fmt: skip
        published = FlowVersionPublished(tenant_id="t1", flow_id="f1", flow_version=1, flow=flow)
        await publish_flow_events(infra.kafka_bootstrap, sandbox.topics, [published])
        logs = tmp_path_factory.mktemp("logs")
        stacks = [
            Stack.build(sandbox, ("projector", "ingest", "api"), logs / "1", **LIMITS),
            Stack.build(sandbox, ("api",), logs / "2", **LIMITS),
            Stack.build(sandbox, ("api",), logs / "3", **SHORT),
        ]
        for i in (1, 2, 3):
            (logs / str(i)).mkdir()
        await asyncio.gather(*(s.start() for s in stacks))
        try:
            db = await connect(infra.database_url, sandbox.schema)
            try:
                deadline = time.monotonic() + 30
                while not await db.fetchval("SELECT count(*) FROM flows"):
                    assert time.monotonic() < deadline, "flow not projected"
                    await asyncio.sleep(0.05)
            finally:
                await db.close()
            first = stacks[0]
            yield Env(sandbox, first["api"].url, stacks[1]["api"].url, first["ingest"].url, stacks[2]["api"].url)
        finally:
            for s in stacks:
                s.stop()


async def test_a_burst_of_reads_admits_exactly_the_limit(env: Env) -> None:
    async with _client(env.api1, await env.key()) as c:
        answers = await _burst([c.get("/v1/runs") for _ in range(READS + 10)])
    _assert_burst(answers, READS, 200)


async def test_a_burst_of_writes_admits_exactly_the_limit(env: Env) -> None:
    async with _client(env.api1, await env.key()) as c:
        answers = await _burst([c.post("/v1/api-keys", json={"scopes": ["runs:read"]}) for _ in range(WRITES + 4)])
        listed = (await c.get("/v1/api-keys")).json()["data"]
    _assert_burst(answers, WRITES, 201)
    created = {r.json()["id"] for r in answers if r.status_code == 201}
    assert created <= {k["id"] for k in listed}


async def test_a_burst_of_triggers_admits_exactly_the_limit_and_leaves_writes_alone(env: Env) -> None:
    key = await env.key()
    async with _client(env.ingest, key) as c:
        answers = await _burst([c.post("/v1/flows/f1/trigger", json={"input": {"n": i}}) for i in range(TRIGGERS + 4)])
    _assert_burst(answers, TRIGGERS, 202)
    assert all(r.json()["status"] == "QUEUED" for r in answers if r.status_code == 202)
    async with _client(env.api1, key) as c:
        write = await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})
    assert write.status_code == 201 and write.headers["X-RateLimit-Remaining"] == str(WRITES - 1)


async def test_two_api_processes_share_one_budget(env: Env) -> None:
    key = await env.key()
    async with _client(env.api1, key) as one, _client(env.api2, key) as two:
        answers = await _burst([c.get("/v1/runs") for _ in range(15) for c in (one, two)])
    _assert_burst(answers, READS, 200)
    # Each process could admit at most 15 of its own: both admitted some of the shared 20.
    by_process = [sum(r.status_code == 200 for r in answers[i::2]) for i in (0, 1)]
    assert all(n >= READS - 15 for n in by_process), by_process


async def test_limits_are_per_key_and_per_class(env: Env) -> None:
    spent, fresh = await env.key(), await env.key()
    async with _client(env.api1, spent) as c:
        _assert_burst(await _burst([c.get("/v1/runs") for _ in range(READS + 1)]), READS, 200)
        assert (await c.get("/v1/runs")).status_code == 429
        write = await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})
    assert write.status_code == 201 and write.headers["X-RateLimit-Limit"] == str(WRITES)
    async with _client(env.api2, fresh) as c:
        r = await c.get("/v1/runs")
    assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == str(READS - 1)


async def test_every_authenticated_answer_carries_the_headers(env: Env) -> None:
    reader = await env.key(("runs:read",))
    async with _client(env.api1, reader) as c:
        missing = await c.get("/v1/runs/run_missing")
        forbidden = await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})
        async with c.stream("GET", "/v1/stream") as stream:
            streamed = stream
    async with _client(env.api1, await env.key()) as c:
        invalid = await c.post("/v1/api-keys", json={"scopes": ["runs:read"], "color": "red"})
    async with httpx.AsyncClient(base_url=env.api1) as c:
        anonymous = await c.get("/v1/runs")
    statuses = (missing.status_code, forbidden.status_code, streamed.status_code, invalid.status_code)
    assert statuses == (404, 403, 200, 422)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert missing.headers["X-RateLimit-Remaining"] == str(READS - 1) and forbidden.headers["X-RateLimit-Limit"] == "5"
    assert streamed.headers["X-RateLimit-Remaining"] == str(READS - 2) and invalid.headers["X-RateLimit-Limit"] == "5"
    assert anonymous.status_code == 401 and "X-RateLimit-Limit" not in anonymous.headers


async def test_a_refused_client_gets_in_when_retry_after_says(env: Env) -> None:
    async with _client(env.short, await env.key()) as c:
        answers = await _burst([c.get("/v1/runs") for _ in range(5)])
        refused_at = time.time()
        _assert_burst(answers, 3, 200)
        retry_after = max(int(r.headers["Retry-After"]) for r in answers if r.status_code == 429)
        assert retry_after <= 4  # a full 2-second window, then a third of one to slide
        deadline = time.monotonic() + 10
        while (r := await c.get("/v1/runs")).status_code == 429:  # refused requests use no budget
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert r.status_code == 200
    assert retry_after - 1 <= time.time() - refused_at <= retry_after + 0.5, (retry_after, time.time() - refused_at)
