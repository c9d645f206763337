"""API keys on real processes: create, list, get, rotate with a grace period, revoke — across two API processes,
two tenants and both environments — and only the key's hash is ever stored."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from schemas.events import EventBase, RunRequested
from schemas.flows import Environment
from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import Env, KeySpec, also_running, append_ledger, db_rows, running, wait_until

CACHE_TTL_S = 5.0  # the Authenticator's: the longest another process may still accept a revoked key


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {
        "admin": KeySpec("t1", name="bootstrap"),  # PRODUCTION, all scopes
        "admin_test": KeySpec("t1", environment="TESTING", scopes=("admin",)),
        "other": "t2",  # PRODUCTION, all scopes
    }
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api")) as env:
        live = run_events("run-live", tenant_id="t1", steps=1, start=datetime.now(UTC))
        test = _testing(run_events("run-test", tenant_id="t1", steps=1, start=datetime.now(UTC)))
        await append_ledger(env.sandbox, live + test)
        yield env


@pytest.fixture(scope="module")
async def api2(env: Env, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A second API process on the same database, as when the API is scaled out: its URL."""
    async with also_running(env, tmp_path_factory, ("api",)) as second:
        yield second["api"].url


async def create(env: Env, key: str | None = None, **body: Any) -> dict[str, Any]:
    return dict(await env.ok("POST", "/v1/api-keys", key, status=201, json={"scopes": ["runs:read"], **body}))


async def _status(api: str, key: str, path: str = "/v1/runs") -> int:
    async with httpx.AsyncClient(base_url=api, timeout=10) as c:
        return (await c.get(path, headers={"Authorization": f"Bearer {key}"})).status_code


async def _first_401(api: str, key: str, within: float) -> float:
    """Polls with the key until it is refused; returns the time.time() of the first 401."""
    deadline = time.monotonic() + within
    while (status := await _status(api, key)) == 200:
        assert time.monotonic() < deadline, f"key still accepted after {within} s"
        await asyncio.sleep(0.05)
    assert status == 401
    return time.time()


def _testing(events: list[EventBase]) -> list[EventBase]:
    first = events[0]
    assert isinstance(first, RunRequested)
    return [first.model_copy(update={"payload": first.payload.model_copy(update={"environment": Environment.TESTING})}),
            *events[1:]]  # fmt: skip


async def test_create_list_get_show_the_key_once_and_store_only_its_hash(env: Env) -> None:
    created = await create(env, name="ci deploys", scopes=["runs:read", "runs:write"])
    key = created.pop("key")
    assert key.startswith("ft_live_") and len(key) == len("ft_live_") + 43  # 256 random bits, base64url
    assert created["id"].startswith("key_") and key.startswith(created["prefix"]) and len(created["prefix"]) < 16
    assert created["scopes"] == ["runs:read", "runs:write"] and created["environment"] == "PRODUCTION"
    assert created["status"] == "active" and created["name"] == "ci deploys" and created["created_at"]
    assert await _status(env.url("api"), key) == 200
    assert await _status(env.url("api"), key, "/v1/api-keys") == 403  # no admin scope

    async with env.client() as c:
        listed = (await c.get("/v1/api-keys")).json()["data"]
        one = await c.get(f"/v1/api-keys/{created['id']}")
    assert one.status_code == 200 and one.json() == created
    assert [k for k in listed if k["id"] == created["id"]] == [created]
    assert {k["name"] for k in listed} >= {"bootstrap", "ci deploys"}
    secret = key[len("ft_live_") :]
    for shown in (*listed, one.json()):
        assert "key" not in shown and "key_hash" not in shown
        assert not any(secret[4:] in str(value) for value in shown.values())

    (row,) = await db_rows(env, "SELECT * FROM api_keys WHERE id = $1", created["id"])
    # The hash, and the first 12 characters as the lookup prefix: the rest of the key is nowhere.
    assert bytes(row["key_hash"]) == hashlib.sha256(key.encode()).digest()
    assert not any(secret[12:] in str(value) for value in dict(row).values())


async def test_bad_bodies_get_the_error_envelope(env: Env) -> None:
    async with env.client() as c:
        extra = await c.post("/v1/api-keys", json={"scopes": ["runs:read"], "key": "ft_live_mine"})
        scope = await c.post("/v1/api-keys", json={"scopes": ["runs:read", "root"]})
        environment = await c.post("/v1/api-keys", json={"scopes": ["runs:read"], "environment": "STAGING"})
        empty = await c.post("/v1/api-keys", json={"scopes": []})
        garbled = await c.post("/v1/api-keys", content=b"{scopes", headers={"Content-Type": "application/json"})
        target = (await c.post("/v1/api-keys", json={"scopes": ["runs:read"]})).json()["id"]
        rotate_extra = await c.post(f"/v1/api-keys/{target}/rotate", json={"grace": 5})
        negative = await c.post(f"/v1/api-keys/{target}/rotate", json={"grace_period_s": -1})
    for r in (extra, scope, environment, empty, rotate_extra, negative):
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "validation_error" and r.json()["error"]["request_id"]
    assert "key" in extra.json()["error"]["message"] and "root" in scope.json()["error"]["message"]
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_request"


async def test_rotation_keeps_the_old_key_for_the_grace_period_then_401(env: Env, api2: str) -> None:
    old = await create(env, name="rotating")
    for api in (env.url("api"), api2):  # both processes have the old key cached
        assert await _status(api, old["key"]) == 200
    async with env.client() as c:
        rotated_at = time.time()
        r = await c.post(f"/v1/api-keys/{old['id']}/rotate", json={"grace_period_s": 1.5})
        assert r.status_code == 201, r.text
        new = r.json()
        again = await c.post(f"/v1/api-keys/{old['id']}/rotate", json={})
    assert new["key"] != old["key"] and new["id"] != old["id"] and new["key"].startswith("ft_live_")
    assert (new["name"], new["scopes"], new["environment"]) == ("rotating", ["runs:read"], "PRODUCTION")
    previous = new["previous"]
    assert previous["id"] == old["id"] and previous["status"] == "rotated" and previous["replaced_by"] == new["id"]
    ends = datetime.fromisoformat(previous["expires_at"]).timestamp()
    assert again.status_code == 409 and new["id"] in again.json()["error"]["message"]

    # Within the grace period both keys work, on either process; after it the old one is refused by both: at
    # once by the process that rotated it, by the other once its cached copy (from before the rotation) is stale.
    for api in (env.url("api"), api2):
        assert await _status(api, old["key"]) == 200 and await _status(api, new["key"]) == 200
    here, there = await asyncio.gather(_first_401(env.url("api"), old["key"], 10), _first_401(api2, old["key"], 10))
    assert ends - 0.05 <= here <= ends + 1.0, (ends, here)
    assert ends - 0.05 <= there <= max(ends, rotated_at + CACHE_TTL_S) + 1.0, (ends, there)
    assert await _status(env.url("api"), new["key"]) == 200
    async with env.client() as c:
        assert (await c.get(f"/v1/api-keys/{old['id']}")).json()["status"] == "expired"


async def test_rotation_grace_defaults_to_a_day_and_zero_ends_it_now(env: Env) -> None:
    key = await create(env)
    async with env.client() as c:
        r = await c.post(f"/v1/api-keys/{key['id']}/rotate")
        assert r.status_code == 201, r.text
        ends = datetime.fromisoformat(r.json()["previous"]["expires_at"]).timestamp()
        assert abs(ends - time.time() - 86_400) < 60
        replacement = r.json()
        assert await _status(env.url("api"), replacement["key"]) == 200
        r = await c.post(f"/v1/api-keys/{replacement['id']}/rotate", json={"grace_period_s": 0})
    assert r.status_code == 201 and r.json()["previous"]["status"] == "expired"
    assert await _status(env.url("api"), replacement["key"]) == 401
    assert await _status(env.url("api"), r.json()["key"]) == 200


async def test_revoked_key_is_refused_at_once_here_and_within_the_cache_ttl_elsewhere(env: Env, api2: str) -> None:
    key = await create(env)
    for api in (env.url("api"), api2):
        assert await _status(api, key["key"]) == 200
    async with env.client() as c:
        r = await c.post(f"/v1/api-keys/{key['id']}/revoke")
        revoked_at = time.time()
        assert r.status_code == 200 and r.json()["status"] == "revoked" and r.json()["revoked_at"]
        assert await _status(env.url("api"), key["key"]) == 401
        refused = await _first_401(api2, key["key"], CACHE_TTL_S + 5)
        assert refused - revoked_at <= CACHE_TTL_S + 0.5
        twice = await c.post(f"/v1/api-keys/{key['id']}/revoke")
        assert twice.json()["revoked_at"] == r.json()["revoked_at"]
        assert (await c.post(f"/v1/api-keys/{key['id']}/rotate")).status_code == 409

        deleted = await create(env)
        assert await _status(env.url("api"), deleted["key"]) == 200
        assert (await c.delete(f"/v1/api-keys/{deleted['id']}")).status_code == 204
        assert await _status(env.url("api"), deleted["key"]) == 401
        assert (await c.get(f"/v1/api-keys/{deleted['id']}")).json()["status"] == "revoked"
    async with env.client(key=key["key"]) as c:
        r = await c.get("/v1/runs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_tenants_cannot_see_rotate_or_revoke_each_others_keys(env: Env) -> None:
    mine = await create(env, name="t1 only")
    theirs = await create(env, "other", name="t2 only")
    async with env.client(key="other") as c:
        listed = (await c.get("/v1/api-keys")).json()["data"]
        attempts = [
            await c.get(f"/v1/api-keys/{mine['id']}"),
            await c.post(f"/v1/api-keys/{mine['id']}/rotate", json={"grace_period_s": 0}),
            await c.post(f"/v1/api-keys/{mine['id']}/revoke"),
            await c.delete(f"/v1/api-keys/{mine['id']}"),
        ]
    assert theirs["id"] in {k["id"] for k in listed} and not {k["name"] for k in listed} & {"t1 only", "bootstrap"}
    for r in attempts:
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    # A missing id answers the same, so ids cannot be probed.
    async with env.client(key="other") as c:
        missing = await c.get("/v1/api-keys/key_0000000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["message"].startswith("no API key")
    assert await _status(env.url("api"), mine["key"]) == 200
    async with env.client() as c:
        assert (await c.get(f"/v1/api-keys/{mine['id']}")).json()["status"] == "active"


async def test_a_testing_key_manages_testing_keys_only(env: Env) -> None:
    live = await create(env)
    async with env.client(key="admin_test") as c:
        listed = (await c.get("/v1/api-keys")).json()["data"]
        hidden = await c.post(f"/v1/api-keys/{live['id']}/revoke")
        minted = await c.post("/v1/api-keys", json={"scopes": ["admin"], "environment": "PRODUCTION"})
        test_key = await c.post("/v1/api-keys", json={"scopes": ["runs:read"], "environment": "TESTING"})
    assert listed and {k["environment"] for k in listed} == {"TESTING"}
    assert hidden.status_code == 404 and minted.status_code == 403
    assert minted.json()["error"]["code"] == "forbidden"
    assert test_key.status_code == 201 and test_key.json()["key"].startswith("ft_test_")


async def test_keys_made_by_the_api_see_only_their_environments_runs(env: Env) -> None:
    # test_runs_api covers every filter with directly made keys; this checks the API stores the environment.
    live = await create(env)
    test = await create(env, environment="TESTING")
    assert test["key"].startswith("ft_test_") and test["environment"] == "TESTING"

    async def ids(key: str) -> list[str]:
        async with env.client(key=key) as c:
            return [r["id"] for r in (await c.get("/v1/runs")).json()["data"]]

    async def each_its_own() -> bool:
        return (await ids(live["key"]), await ids(test["key"])) == (["run-live"], ["run-test"])

    await wait_until(each_its_own, what="each key seeing only its environment's run")
