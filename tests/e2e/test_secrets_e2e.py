"""Secrets at rest on real processes: a connector with a password, a flow whose step headers carry an inline
credential and a `{{ secrets.NAME }}` reference, a stored secret. The step receives the real values; then no
canary is anywhere at rest — not in any table of the sandbox's PostgreSQL schema, not in any of its Kafka topics,
not in an API answer, not in a service log."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from services.common.db import connect
from tests.conftest import Infra, Sandbox
from tests.harness import Env, running, stub_upstream, topic_records

RUN = uuid.uuid4().hex[:10]
STORE_CANARY = f"store-canary-{RUN}"
INLINE_CANARY = f"inline-canary-{RUN}"
CONNECTOR_CANARY = f"connector-canary-{RUN}"
CANARIES = (STORE_CANARY, INLINE_CANARY, CONNECTOR_CANARY)


async def _echo(request: web.Request) -> web.Response:
    """The loopback upstream the step calls: echoes each request's headers back."""
    return web.json_response({"received": dict(request.headers), "body": await request.text()})


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with stub_upstream({("POST", "/hook"): _echo}) as up, running(
        infra, tmp_path_factory, keys={"a": "tenant-a", "b": "tenant-b"}, upstream=up,
        env={"FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true"},
    ) as env:  # fmt: skip
        yield env


def _with_password(dsn: str, password: str) -> str:
    scheme, rest = dsn.split("://", 1)
    user, _, host = rest.rpartition("@")
    return f"{scheme}://{user.split(':')[0] or 'flowtrail'}:{password}@{host}"


async def _dump_postgres(sandbox: Sandbox) -> str:
    """Every row of every table of the sandbox's schema, as text."""
    conn = await connect(sandbox.infra.database_url, sandbox.schema)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename", sandbox.schema)]  # fmt: skip
        assert {"secrets", "connectors", "flow_versions", "run_steps", "run_events"} <= set(tables)
        parts = []
        for table in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{sandbox.schema}"."{table}" t')
            parts += [f"{table}: {r['row']}" for r in rows]
        return "\n".join(parts)
    finally:
        await conn.close()


async def _dump_kafka(sandbox: Sandbox) -> bytes:
    """Every record (key, value, headers) of every topic of the sandbox, from the beginning."""
    admin = AIOKafkaAdminClient(bootstrap_servers=sandbox.infra.kafka_bootstrap)
    await admin.start()
    try:
        topics = sorted(t for t in await admin.list_topics() if sandbox.schema in t)
    finally:
        await admin.close()
    assert sandbox.topics.flows in topics and sandbox.topics.ledger in topics
    chunks: list[bytes] = []
    for r in await topic_records(sandbox.infra.kafka_bootstrap, topics):
        chunks += [r.key or b"", r.value or b""]
        chunks += [k.encode() + b"=" + (v or b"") for k, v in r.headers or ()]
    assert chunks, "the sandbox's topics are empty"
    return b"\n".join(chunks)


async def test_secrets_reach_the_step_and_nothing_at_rest_holds_them(env: Env) -> None:
    listener = env.upstream
    async with env.client("api", timeout=20) as api:
        r = await api.put("/v1/secrets/hook_token", json={"value": STORE_CANARY})
        assert r.status_code == 201, r.text
        dsn = _with_password(env.sandbox.infra.database_url, CONNECTOR_CANARY)
        r = await api.post("/v1/connectors", json={"name": "warehouse", "kind": "postgresql", "config": {"dsn": dsn}})
        assert r.status_code == 201, r.text
        connector = r.json()
        assert CONNECTOR_CANARY not in r.text and ":***@" in connector["config"]["dsn"]
        # The connector is used as it was given: the password is decrypted for the login (trust auth takes any).
        r = await api.post(f"/v1/connectors/{connector['id']}/verify")
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        flow = {
            "id": "secret-call",
            "name": "Secret call",
            "steps": [
                {"name": "call", "action": "http_request", "input": {
                    "method": "POST", "url": listener.url + "/hook",
                    "headers": {"Authorization": "Bearer {{ secrets.hook_token }}", "X-Api-Key": INLINE_CANARY,
                                "X-Echo": "{{ secrets.hook_token }}", "X-Order": "{{ trigger.order_id }}"},
                    "body": {"order": "{{ trigger.order_id }}"}}},
                {"name": "shape", "action": "transform",
                 "input": {"output": {"leak": "{{ secrets.hook_token }}", "order": "{{ trigger.order_id }}"}}},
            ],
        }  # fmt: skip
        r = await api.post("/v1/flows", json=flow)
        assert r.status_code in (201, 202), r.text
        assert INLINE_CANARY not in r.text
        missing = {"id": "secret-missing", "name": "Missing secret", "steps": [
            {"name": "call", "action": "http_request",
             "input": {"url": listener.url + "/hook", "method": "POST",
                       "headers": {"Authorization": "Bearer {{ secrets.not_there }}"}}}]}  # fmt: skip
        assert (await api.post("/v1/flows", json=missing)).status_code in (201, 202)

        run_id = await env.trigger("secret-call", {"order_id": "SO-7"})
        run = await env.wait_status(run_id)
        assert run["status"] == "SUCCEEDED", run
        # The step got the real values.
        seen = [c.headers for c in listener.requests if c.headers.get("X-Order") == "SO-7"]
        assert len(seen) == 1
        assert seen[0]["Authorization"] == f"Bearer {STORE_CANARY}"
        assert seen[0]["X-Api-Key"] == INLINE_CANARY and seen[0]["X-Echo"] == STORE_CANARY
        # What the run shows: inputs masked, the echoed values scrubbed from the outputs.
        steps = {s["name"]: s for s in run["steps"]}
        assert steps["call"]["input"]["headers"]["Authorization"] == "***"
        assert steps["call"]["input"]["headers"]["X-Echo"] == "***"
        assert steps["call"]["output"]["body"]["received"]["X-Echo"] == "***"
        assert steps["shape"]["output"] == {"leak": "***", "order": "SO-7"}

        failed_id = await env.trigger("secret-missing", {})
        failed = await env.wait_status(failed_id)
        assert failed["status"] == "FAILED", failed
        error = failed["steps"][0]["error"] if failed["steps"][0].get("error") else failed["error"]
        assert error["category"] == "VALIDATION" and error["code"] == "secret_not_found", failed
        assert "not_there" in error["message"]

        answers = [
            (await api.get(path)).text
            for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events", f"/v1/runs/{run_id}/logs",
                         "/v1/flows/secret-call", "/v1/flows/secret-call/versions/1", "/v1/connectors",
                         f"/v1/connectors/{connector['id']}", "/v1/secrets")
        ]  # fmt: skip
    for canary in CANARIES:
        assert not [a for a in answers if canary in a], f"{canary} in an API answer"

    await asyncio.sleep(0.5)  # the projector's last batch
    postgres = await _dump_postgres(env.sandbox)
    assert "enc:v1:" in postgres  # the ciphertexts are there
    kafka = await _dump_kafka(env.sandbox)
    assert b"enc:v1:" in kafka
    logs = "\n".join(p.read_text(errors="replace") for p in env.stack.log_dir.glob("*.log"))
    # The dumps do hold what the run carried in the clear (its trigger's order id) …
    assert "SO-7" in postgres and b"SO-7" in kafka and "secret_not_found" in postgres and logs
    for canary in CANARIES:  # … and no plaintext credential anywhere
        assert canary not in postgres, f"{canary} in PostgreSQL"
        assert canary.encode() not in kafka, f"{canary} in Kafka"
        assert canary not in logs, f"{canary} in a service log"
