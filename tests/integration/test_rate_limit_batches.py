"""Rate limits under a crowd (docs/api-contract.md): one API process counting many keys' requests at once, which it
sends to PostgreSQL together, still admits exactly each key's limit per class and counts each key down on its own."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import Infra
from tests.harness import Env, running

READS, WRITES = 12, 4
KEYS = 4


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    limits = {"FLOWTRAIL_API_RATE_LIMIT_READS": str(READS), "FLOWTRAIL_API_RATE_LIMIT_WRITES": str(WRITES)}
    keys = {f"key{i}": "t1" for i in range(KEYS)}
    async with running(infra, tmp_path_factory, keys=keys, services=("api",), env=limits) as env:
        yield env


async def test_a_crowd_of_keys_and_classes_gets_exactly_each_budget(env: Env) -> None:
    url, keys = env.url("api"), list(env.keys.values())
    # Every key's reads and writes interleaved, in a random order, all in flight at once.
    calls = [(k, "GET") for k in keys for _ in range(READS + 5)]
    calls += [(k, "POST") for k in keys for _ in range(WRITES + 3)]
    random.Random(7).shuffle(calls)
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=httpx.Limits(max_connections=64)) as c:

        async def call(key: str, method: str) -> tuple[str, str, httpx.Response]:
            headers = {"Authorization": f"Bearer {key}"}
            if method == "GET":
                return key, method, await c.get("/v1/runs", headers=headers)
            return key, method, await c.post("/v1/api-keys", headers=headers, json={"scopes": ["runs:read"]})

        answers = await asyncio.gather(*(call(k, m) for k, m in calls))

    for key in keys:
        for method, limit, ok in (("GET", READS, 200), ("POST", WRITES, 201)):
            mine = [r for k, m, r in answers if k == key and m == method]
            admitted = [r for r in mine if r.status_code == ok]
            assert len(admitted) == limit and all(r.status_code == 429 for r in mine if r not in admitted)
            # Each admitted request saw its own place in the key's budget, counting down to 0.
            assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted) == list(range(limit))
            assert {r.headers["X-RateLimit-Limit"] for r in mine} == {str(limit)}
