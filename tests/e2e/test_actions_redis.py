"""redis_get and redis_set steps against a real redis-server (tests/redis_server.py): values, TTL, NX/XX, missing
keys, keys of another type, refused credentials, an unreachable server, and the guard on a tenant's connector."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
import pytest
import redis.asyncio as aioredis

from services.common.connectors import ConnectorRegistry, Resolved
from services.executor.adapters.steps import StepRunners
from tests.conftest import Infra
from tests.e2e.stack import free_port
from tests.harness import running, steps_of
from tests.integration.test_step_actions import failed, run
from tests.redis_server import RedisServer


@pytest.fixture
async def runners(redis: RedisServer) -> AsyncIterator[StepRunners]:
    connectors = {
        "cache": redis.url(),
        "cache-db3": redis.url(db=3),
        "wrong-pass": redis.url("not-it"),
        "no-pass": f"redis://127.0.0.1:{redis.port}/0",
        "gone": f"redis://127.0.0.1:{free_port()}/0",
    }
    r = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=4096, connectors=connectors,
                    max_output_bytes=4096)  # fmt: skip
    yield r
    await r.close()


@pytest.fixture
async def direct(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis.url())
    yield client
    await client.aclose()


def key(name: str) -> str:
    return f"t:{name}:{datetime.now(UTC).timestamp()}"


async def test_set_then_get_text_and_json_values(runners: StepRunners, direct: aioredis.Redis, redis: RedisServer
                                                 ) -> None:  # fmt: skip
    k = key("order")
    written = await run(runners, "redis_set", {"connector": "cache", "key": k, "value": {"id": "SO-1", "qty": 2}})
    assert written.ok, written
    assert written.output["written"] is True and written.output["key"] == k
    assert written.output["connection"] == redis.url("***")  # the password is never shown
    assert await direct.get(k) == b'{"id":"SO-1","qty":2}'  # any non-string value is stored as JSON

    as_json = await run(runners, "redis_get", {"connector": "cache", "key": k, "value_format": "json"})
    assert as_json.ok and as_json.output["value"] == {"id": "SO-1", "qty": 2} and as_json.output["found"] is True
    assert as_json.output["ttl_s"] is None  # no expiry
    as_text = await run(runners, "redis_get", {"connector": "cache", "key": k})
    assert as_text.output["value"] == '{"id":"SO-1","qty":2}'

    plain = key("greeting")
    assert (await run(runners, "redis_set", {"connector": "cache", "key": plain, "value": "héllo"})).ok
    assert await direct.get(plain) == "héllo".encode()  # a string is stored as its UTF-8 text
    assert (await run(runners, "redis_get", {"connector": "cache", "key": plain})).output["value"] == "héllo"


async def test_a_missing_key_is_null_not_an_error(runners: StepRunners) -> None:
    outcome = await run(runners, "redis_get", {"connector": "cache", "key": key("nothing")})
    assert outcome.ok
    assert (outcome.output["found"], outcome.output["value"], outcome.output["ttl_s"]) == (False, None, None)


async def test_a_ttl_expires_the_key(runners: StepRunners, direct: aioredis.Redis) -> None:
    k = key("session")
    outcome = await run(runners, "redis_set", {"connector": "cache", "key": k, "value": "tok", "ttl_s": 0.4})
    assert outcome.ok and outcome.output["ttl_s"] == 0.4
    read = await run(runners, "redis_get", {"connector": "cache", "key": k})
    assert read.output["value"] == "tok" and 0 < read.output["ttl_s"] <= 0.4
    await asyncio.sleep(0.6)
    assert (await run(runners, "redis_get", {"connector": "cache", "key": k})).output["found"] is False
    assert await direct.exists(k) == 0


async def test_nx_writes_only_a_new_key_and_xx_only_an_existing_one(runners: StepRunners) -> None:
    k = key("lock")
    first = await run(runners, "redis_set", {"connector": "cache", "key": k, "value": "a", "condition": "nx"})
    second = await run(runners, "redis_set", {"connector": "cache", "key": k, "value": "b", "condition": "nx"})
    assert first.output["written"] is True and second.ok and second.output["written"] is False
    assert (await run(runners, "redis_get", {"connector": "cache", "key": k})).output["value"] == "a"
    absent = await run(runners, "redis_set", {"connector": "cache", "key": key("none"), "value": 1, "condition": "xx"})
    assert absent.ok and absent.output["written"] is False
    replaced = await run(runners, "redis_set", {"connector": "cache", "key": k, "value": "c", "condition": "xx"})
    assert replaced.output["written"] is True
    assert (await run(runners, "redis_get", {"connector": "cache", "key": k})).output["value"] == "c"


async def test_the_connector_url_picks_the_database(runners: StepRunners, redis: RedisServer) -> None:
    k = key("db3")
    assert (await run(runners, "redis_set", {"connector": "cache-db3", "key": k, "value": "x"})).ok
    assert (await run(runners, "redis_get", {"connector": "cache", "key": k})).output["found"] is False
    assert (await run(runners, "redis_get", {"connector": "cache-db3", "key": k})).output["value"] == "x"


async def test_a_key_of_another_type_or_an_undecodable_value_is_a_validation_error(
    runners: StepRunners, direct: aioredis.Redis
) -> None:
    listed = key("list")
    await direct.rpush(listed, "a", "b")
    category, code, message = failed(await run(runners, "redis_get", {"connector": "cache", "key": listed}))
    assert (category, code) == ("VALIDATION", "wrong_type") and "WRONGTYPE" in message
    text = key("text")
    await direct.set(text, "not json")
    outcome = await run(runners, "redis_get", {"connector": "cache", "key": text, "value_format": "json"})
    assert failed(outcome)[:2] == ("VALIDATION", "not_json")
    binary = key("bin")
    await direct.set(binary, b"\xff\xfe")
    assert failed(await run(runners, "redis_get", {"connector": "cache", "key": binary}))[:2] == (
        "VALIDATION", "not_text")  # fmt: skip


async def test_refused_credentials_are_auth_and_a_step_password_from_secrets_works(
    runners: StepRunners, redis: RedisServer
) -> None:
    for name in ("wrong-pass", "no-pass"):
        category, code, message = failed(await run(runners, "redis_get", {"connector": name, "key": "k"}))
        assert (category, code) == ("AUTH", "auth"), (name, message)
        assert "not-it" not in message
    # The step's `password` (written `{{ secrets.NAME }}` in a flow) overrides the connector URL's.
    fixed = await run(runners, "redis_get", {"connector": "no-pass", "key": key("k"), "password": redis.password})
    assert fixed.ok and fixed.output["found"] is False


async def test_an_unreachable_server_is_transient_and_an_unknown_connector_validation(runners: StepRunners) -> None:
    category, code, _ = failed(await run(runners, "redis_set", {"connector": "gone", "key": "k", "value": "v"}))
    assert (category, code) == ("TRANSIENT", "network")
    category, code, message = failed(await run(runners, "redis_get", {"connector": "nope", "key": "k"}))
    assert (category, code) == ("VALIDATION", "unknown_connector") and "cache" in message


class _TenantConnectors(ConnectorRegistry):
    """Every name is the tenant's own connector (as registered with POST /v1/connectors): not trusted."""

    def __init__(self, url: str) -> None:
        super().__init__({}, None)
        self.url = url

    async def resolve(self, tenant_id: str, environment: str, name: str, schemes: tuple[str, ...],
                      kind: str) -> Resolved:  # fmt: skip
        return Resolved(self.url, trusted=False)


async def test_a_tenant_connector_to_a_private_address_is_refused_at_the_connection(redis: RedisServer) -> None:
    runners = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=4096)
    runners.redis.connectors = _TenantConnectors(redis.url())
    try:
        outcome = await run(runners, "redis_get", {"connector": "mine", "key": "k"})
        category, code, message = failed(outcome)
        assert (category, code) == ("VALIDATION", "blocked_address") and "127.0.0.1" in message
        assert redis.password not in message
    finally:
        await runners.close()


async def test_a_run_writes_and_reads_redis_with_the_password_from_the_secrets_store(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory, redis: RedisServer
) -> None:
    """On real processes: the operator's connector carries no password, the step takes it from the tenant's secrets
    store; the run shows key, value and TTL, and the password is in no event."""
    connectors = orjson.dumps({"cache": f"redis://127.0.0.1:{redis.port}/0"}).decode()
    async with running(infra, tmp_path_factory, env={"FLOWTRAIL_EXECUTOR_CONNECTORS": connectors}) as env:
        await env.ok("PUT", "/v1/secrets/redis_password", json={"value": redis.password}, status=201)
        secret = "{{ secrets.redis_password }}"
        k = key("e2e") + ":{{ trigger.order_id }}"
        flow = {"id": "cache-order", "name": "Cache an order", "steps": [
            {"name": "put", "action": "redis_set",
             "input": {"connector": "cache", "key": k, "value": {"order": "{{ trigger.order_id }}"}, "ttl_s": 60,
                       "condition": "nx", "password": secret}},
            {"name": "read", "action": "redis_get",
             "input": {"connector": "cache", "key": k, "value_format": "json", "password": secret},
             "assertions": [{"expression": "value.order", "expected": "{{ trigger.order_id }}"}]},
        ]}  # fmt: skip
        bad_step = {"name": "put", "action": "redis_set", "input": {"connector": "cache", "key": "k", "ttl": 5}}
        bad = {**flow, "id": "bad-cache", "steps": [bad_step]}
        refused = await env.api("POST", "/v1/flows", json=bad)
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert "redis_set input:" in message and "value: Field required" in message and "ttl: Extra inputs" in message
        await env.create_flow(flow)

        run_id = await env.trigger("cache-order", {"order_id": "SO-11"})
        run = await env.wait_status(run_id, within=90)
        assert run["status"] == "SUCCEEDED", run
        put, read = steps_of(run)["put"], steps_of(run)["read"]
        assert put["input"]["password"] == "***" and put["output"]["written"] is True
        assert put["output"]["key"].endswith(":SO-11") and put["output"]["ttl_s"] == 60
        assert read["output"]["value"] == {"order": "SO-11"} and 0 < read["output"]["ttl_s"] <= 60
        assert redis.password not in orjson.dumps(await env.events(run_id)).decode()
