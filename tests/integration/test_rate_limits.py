"""Rate limits on real processes (docs/api-contract.md): a burst admits exactly the limit of its class (reads, writes,
triggers) and the rest get 429 with Retry-After; two API processes share one key's budget; budgets are per key and per
class; every authenticated answer carries the X-RateLimit-* headers; a refused client is let in when Retry-After
says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import httpx
import pytest

from tests.conftest import Infra
from tests.harness import Env, KeySpec, also_running, auth, flow, make_keys, running

READS, WRITES, TRIGGERS = 20, 5, 3
LIMITS = {
    "FLOWTRAIL_API_RATE_LIMIT_READS": str(READS), "FLOWTRAIL_API_RATE_LIMIT_WRITES": str(WRITES),
    "FLOWTRAIL_INGEST_RATE_LIMIT_READS": str(READS), "FLOWTRAIL_INGEST_RATE_LIMIT_TRIGGERS": str(TRIGGERS),
}  # fmt: skip
# A third API process with a 2-second window, to see a refused client let in again without waiting a minute.
SHORT = {"FLOWTRAIL_API_RATE_LIMIT_READS": "3", "FLOWTRAIL_API_RATE_LIMIT_WINDOW_S": "2"}


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    f1 = flow("t1", "f1", [{"name": "shape", "action": "transform", "input": {"output": {"ok": True}}}], name="F1")
    services = ("projector", "ingest", "api")
    async with running(infra, tmp_path_factory, keys={"admin": "t1"}, flows=[f1], services=services, env=LIMITS) as env:
        yield env


@pytest.fixture(scope="module")
async def api2(env: Env, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A second API process with the same limits, sharing the first one's budgets: its URL."""
    async with also_running(env, tmp_path_factory, ("api",), LIMITS) as second:
        yield second["api"].url


@pytest.fixture(scope="module")
async def short(env: Env, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with also_running(env, tmp_path_factory, ("api",), SHORT) as third:
        yield third["api"].url


async def fresh_key(env: Env, scopes: tuple[str, ...] = ("runs:read", "runs:write", "admin")) -> str:
    """A fresh key: each test starts with full budgets."""
    return (await make_keys(env.sandbox, {"key": KeySpec("t1", scopes=scopes)}))["key"]


def _client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, timeout=20, headers=auth(key))


def _assert_burst(answers: list[httpx.Response], limit: int, ok: int) -> None:
    """Exactly `limit` admitted, counting down to 0; the rest refused with Retry-After and the envelope."""
    admitted = [r for r in answers if r.status_code == ok]
    refused = [r for r in answers if r.status_code == 429]
    assert len(admitted) == limit and len(refused) == len(answers) - limit, [r.status_code for r in answers]
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted) == list(range(limit))
    now = time.time()
    for r in answers:
        assert r.headers["X-RateLimit-Limit"] == str(limit)
        assert now - 1 <= int(r.headers["X-RateLimit-Reset"]) <= now + 121  # unix seconds (docs/api-contract.md)
    for r in refused:
        assert r.headers["X-RateLimit-Remaining"] == "0" and 1 <= int(r.headers["Retry-After"]) <= 120
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and "retry after" in error["message"] and error["request_id"]


async def _burst(requests: list[Awaitable[httpx.Response]]) -> list[httpx.Response]:
    return list(await asyncio.gather(*requests))


async def test_a_burst_of_reads_admits_exactly_the_limit(env: Env) -> None:
    async with _client(env.url("api"), await fresh_key(env)) as c:
        answers = await _burst([c.get("/v1/runs") for _ in range(READS + 10)])
    _assert_burst(answers, READS, 200)


async def test_a_burst_of_writes_admits_exactly_the_limit(env: Env) -> None:
    async with _client(env.url("api"), await fresh_key(env)) as c:
        answers = await _burst([c.post("/v1/api-keys", json={"scopes": ["runs:read"]}) for _ in range(WRITES + 4)])
        listed = (await c.get("/v1/api-keys")).json()["data"]
    _assert_burst(answers, WRITES, 201)
    created = {r.json()["id"] for r in answers if r.status_code == 201}
    assert created <= {k["id"] for k in listed}


async def test_a_burst_of_triggers_admits_exactly_the_limit_and_leaves_writes_alone(env: Env) -> None:
    key = await fresh_key(env)
    async with _client(env.url("ingest"), key) as c:
        answers = await _burst([c.post("/v1/flows/f1/trigger", json={"input": {"n": i}}) for i in range(TRIGGERS + 4)])
    _assert_burst(answers, TRIGGERS, 202)
    assert all(r.json()["status"] == "QUEUED" for r in answers if r.status_code == 202)
    async with _client(env.url("api"), key) as c:
        write = await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})
    assert write.status_code == 201 and write.headers["X-RateLimit-Remaining"] == str(WRITES - 1)


async def test_two_api_processes_share_one_budget(env: Env, api2: str) -> None:
    key = await fresh_key(env)
    async with _client(env.url("api"), key) as one, _client(api2, key) as two:
        answers = await _burst([c.get("/v1/runs") for _ in range(15) for c in (one, two)])
    _assert_burst(answers, READS, 200)
    # Each process could admit at most 15 of its own: both admitted some of the shared 20.
    by_process = [sum(r.status_code == 200 for r in answers[i::2]) for i in (0, 1)]
    assert all(n >= READS - 15 for n in by_process), by_process


async def test_limits_are_per_key_and_per_class(env: Env, api2: str) -> None:
    spent, fresh = await fresh_key(env), await fresh_key(env)
    async with _client(env.url("api"), spent) as c:
        _assert_burst(await _burst([c.get("/v1/runs") for _ in range(READS + 1)]), READS, 200)
        assert (await c.get("/v1/runs")).status_code == 429
        write = await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})
    assert write.status_code == 201 and write.headers["X-RateLimit-Limit"] == str(WRITES)
    async with _client(api2, fresh) as c:
        r = await c.get("/v1/runs")
    assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == str(READS - 1)


async def test_every_authenticated_answer_carries_the_headers(env: Env) -> None:
    reader = await fresh_key(env, ("runs:read",))
    async with _client(env.url("api"), reader) as c:
        missing = await c.get("/v1/runs/run_missing")
        forbidden = await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})
        async with c.stream("GET", "/v1/stream") as stream:
            streamed = stream
    async with _client(env.url("api"), await fresh_key(env)) as c:
        invalid = await c.post("/v1/api-keys", json={"scopes": ["runs:read"], "color": "red"})
    async with httpx.AsyncClient(base_url=env.url("api")) as c:
        anonymous = await c.get("/v1/runs")
    statuses = (missing.status_code, forbidden.status_code, streamed.status_code, invalid.status_code)
    assert statuses == (404, 403, 200, 422)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert missing.headers["X-RateLimit-Remaining"] == str(READS - 1) and forbidden.headers["X-RateLimit-Limit"] == "5"
    assert streamed.headers["X-RateLimit-Remaining"] == str(READS - 2) and invalid.headers["X-RateLimit-Limit"] == "5"
    assert anonymous.status_code == 401 and "X-RateLimit-Limit" not in anonymous.headers


async def test_a_refused_client_gets_in_when_retry_after_says(env: Env, short: str) -> None:
    async with _client(short, await fresh_key(env)) as c:
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
