"""Trustworthy intake on real processes: no client's input breaks ingest for anyone else (invariant 8).

Oversized inputs and bodies are refused with 413 before anything reaches Kafka; a 20,000-input batch and then
1,000 triggers from three tenants all answer 202 while /readyz stays ready; an Idempotency-Key makes 1,000
concurrent triggers one run, across ingest processes; a batch the broker takes only in part answers 503 saying
exactly which inputs are durable, and its retry with the same key completes it with each run exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.topics import partition_for
from services.common.idempotency import derived_run_ids
from tests.conftest import Infra
from tests.harness import Env, auth, flow, records_in, running, wait_until

TENANTS = ("t1", "t2", "t3")
MAX_BODY = 8 * 1024 * 1024


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    noop = [flow(t, "noop", [{"name": "echo", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}],
                 name="No-op") for t in TENANTS]  # fmt: skip
    # A long append timeout: on a loaded 2-core machine an acknowledgement can take seconds, and this module is
    # about limits and keys, not outages (tests/e2e/test_intake_outage.py has those).
    limits = {"FLOWTRAIL_INGEST_MAX_BODY_BYTES": str(MAX_BODY), "FLOWTRAIL_INGEST_SCHEDULER": "false",
              "FLOWTRAIL_KAFKA_APPEND_TIMEOUT_S": "60"}  # fmt: skip
    async with running(infra, tmp_path_factory, keys={t: t for t in TENANTS}, flows=noop, env=limits) as env:
        # A second ingest replica on the same database and topics: idempotency keys hold across processes.
        env.stack.add("ingest", "ingest2")
        await env.stack.start("ingest2")
        yield env


def _noop(env: Env, replica: str = "ingest") -> str:
    """Where the no-op flow is triggered, on `replica`."""
    return env.url(replica) + "/v1/flows/noop/trigger"


async def _triggers(env: Env) -> int:
    """Records in the triggers topic: what ingest has appended."""
    return await records_in(env.infra.kafka_bootstrap, env.sandbox.topics.triggers)


async def test_oversized_input_and_body_are_413_and_nothing_is_appended(env: Env) -> None:
    before = await _triggers(env)
    url = _noop(env)
    async with httpx.AsyncClient(timeout=60, headers=auth(env.keys["t1"])) as client:
        one = await client.post(url, json={"input": {"blob": "x" * 2_000_000}})
        assert one.status_code == 413, one.text
        error = one.json()["error"]
        assert error["code"] == "payload_too_large" and error["message"].startswith("input is 2,000,0")
        assert "Nothing was appended" in error["message"] and error["request_id"]

        # In a batch, the refused input is named by its index; the other inputs are not appended either.
        batch: list[dict[str, Any]] = [{"n": i} for i in range(5)]
        batch[3] = {"n": 3, "blob": "y" * 600_000}
        many = await client.post(url, json={"inputs": batch})
        assert many.status_code == 413, many.text
        assert many.json()["error"]["message"].startswith("inputs[3] is 600,0")
        assert many.json()["error"]["details"]["index"] == 3

        # A body over the limit is refused before it is read: with a Content-Length, and streamed without one.
        huge = b'{"inputs": [' + b",".join(b'{"n": 1}' for _ in range(MAX_BODY // 8)) + b"]}"
        declared = await client.post(url, content=huge, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(huge), 256 * 1024):
                yield huge[start : start + 256 * 1024]

        streamed = await client.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
    assert await _triggers(env) == before


async def test_a_huge_batch_then_every_tenant_keeps_triggering_while_ready(env: Env) -> None:
    before = await _triggers(env)
    readiness: list[int] = []
    stop = asyncio.Event()

    async def watch_readyz() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not stop.is_set():
                readiness.append((await client.get(f"{env.url('ingest')}/readyz")).status_code)
                await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_readyz())
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            inputs = [{"n": i, "note": "a normal input of a few dozen bytes"} for i in range(20_000)]
            big = await client.post(_noop(env), json={"inputs": inputs},
                                    headers=auth(env.keys["t1"]))  # fmt: skip
            assert big.status_code == 202, big.text
            assert big.json()["count"] == 20_000 and len(set(big.json()["run_ids"])) == 20_000

            gate = asyncio.Semaphore(50)

            async def one(i: int) -> httpx.Response:
                async with gate:
                    tenant = TENANTS[i % 3]
                    return await client.post(_noop(env), json={"input": {"n": i}},
                                             headers=auth(env.keys[tenant]))  # fmt: skip

            answers = await asyncio.gather(*(one(i) for i in range(1_000)))
    finally:
        stop.set()
        await watcher
    assert [a.status_code for a in answers] == [202] * 1_000, {a.status_code: a.text for a in answers}
    assert readiness and set(readiness) == {200}, readiness
    assert await _triggers(env) == before + 21_000


async def test_one_idempotency_key_makes_one_run_across_replicas(env: Env) -> None:
    before = await _triggers(env)
    headers = auth(env.keys["t2"], **{"Idempotency-Key": "order-42-created"})
    body = {"input": {"n": 42}}
    # Generous: on a busy 2-core machine 1,000 requests queue for a connection well past a default pool timeout.
    timeout = httpx.Timeout(60.0, pool=300.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=100)) as client:
        answers = await asyncio.gather(*(
            client.post(_noop(env, ("ingest", "ingest2")[i % 2]), json=body, headers=headers)
            for i in range(1_000)
        ))  # fmt: skip
        assert {a.status_code for a in answers} == {202}, {a.status_code: a.text for a in answers}
        run_ids = {a.json()["run_id"] for a in answers}
        assert len(run_ids) == 1, run_ids
        assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 999

        # Later, on either replica: the same answer, nothing new.
        again = await client.post(_noop(env, "ingest2"), json=body, headers=headers)
        assert again.status_code == 202 and again.json()["run_id"] in run_ids
        assert again.headers["Idempotent-Replayed"] == "true"

        # The same key with another body is refused and creates nothing.
        other = await client.post(_noop(env), json={"input": {"n": 43}}, headers=headers)
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"

        # Keys are per tenant: another tenant's identical key is its own request.
        same_key = auth(env.keys["t3"], **{"Idempotency-Key": "order-42-created"})
        theirs = await client.post(_noop(env), json=body, headers=same_key)
        assert theirs.status_code == 202 and theirs.json()["run_id"] not in run_ids
        assert "Idempotent-Replayed" not in theirs.headers

        bad = await client.post(_noop(env), json=body,
                                headers=auth(env.keys["t2"], **{"Idempotency-Key": "x" * 300}))  # fmt: skip
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]["message"]
    assert await _triggers(env) == before + 2
    final = await env.wait_all(sorted(run_ids), "t2")
    assert set(final.values()) == {"SUCCEEDED"}


async def _set_max_message_bytes(bootstrap: str, topic: str, value: int | None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        configs: dict[str, Any] = {"max.message.bytes": str(value if value is not None else 1_048_588)}
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        await admin.close()


async def test_a_batch_taken_in_part_says_so_and_its_keyed_retry_completes_it_once(env: Env) -> None:
    """The broker refuses one partition's records (its topic's message size was lowered under a running ingest):
    the answer names the durable inputs; the next requests still succeed; the retry with the key completes it."""
    bootstrap, topic = env.sandbox.infra.kafka_bootstrap, env.sandbox.topics.triggers
    key = "nightly-import-2026-12-06"
    run_ids = derived_run_ids("t3", "PRODUCTION", key, 20)
    big = {i for i, r in enumerate(run_ids) if partition_for(r, env.sandbox.partitions) == 1}
    assert 0 < len(big) < 20
    inputs = [{"n": i, "blob": "z" * (15_000 if i in big else 10)} for i in range(20)]
    headers = auth(env.keys["t3"], **{"Idempotency-Key": key})
    url = _noop(env)
    await _set_max_message_bytes(bootstrap, topic, 12_000)
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            first = await client.post(url, json={"inputs": inputs}, headers=headers)
            assert first.status_code == 503, first.text
            assert first.headers["Retry-After"]
            error = first.json()["error"]
            assert error["code"] == "kafka_unavailable" and "same Idempotency-Key" in error["message"]
            assert error["details"]["appended_indexes"] == sorted(set(range(20)) - big)
            assert error["details"]["refused"] == len(big) and error["details"]["unknown"] == 0

            # The failure poisoned nothing: every tenant's next triggers succeed without restarting ingest.
            for tenant in TENANTS:
                ok = await client.post(url, json={"input": {"n": 1}}, headers=auth(env.keys[tenant]))
                assert ok.status_code == 202, ok.text
    finally:
        await _set_max_message_bytes(bootstrap, topic, None)

    async def taken() -> httpx.Response | None:  # the broker applies a topic's configuration change within moments
        r = await env.http.post(url, json={"inputs": inputs}, headers=headers, timeout=60)
        return r if r.status_code != 503 else None

    retry = await wait_until(taken, 30, "the batch taken again", every=0.5)
    assert retry.status_code == 202, retry.text
    assert retry.json()["run_ids"] == run_ids
    replay = await env.http.post(url, json={"inputs": inputs}, headers=headers, timeout=60)
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["run_ids"] == run_ids
    final = await env.wait_all(run_ids, "t3")
    assert set(final.values()) == {"SUCCEEDED"}
    for run_id in run_ids:  # each run exactly once: one request, one start, one end
        types = [e["type"] for e in await env.events(run_id, "t3")]
        assert types.count("RunRequested") == 1 and types.count("RunSucceeded") == 1, types


async def test_api_writes_honour_idempotency_keys(env: Env) -> None:
    """Flow writes and run actions on the API: a repeated request with its key changes nothing and answers the
    first result; another body with the same key is refused; a body over the API's limit is 413."""
    async with httpx.AsyncClient(timeout=30) as client:
        flow = {"id": "keyed", "name": "Keyed", "steps": [
            {"name": "only", "action": "transform", "input": {"output": {"ok": True}}}]}  # fmt: skip
        headers = auth(env.keys["t1"], **{"Idempotency-Key": "create-keyed-flow"})
        first, second = await asyncio.gather(*(client.post(f"{env.url('api')}/v1/flows", json=flow, headers=headers)
                                               for _ in range(2)))  # fmt: skip
        # 201 once projected, 202 when written but not yet projected: a replay answers what the first one did.
        assert first.status_code == second.status_code and first.status_code in (201, 202), (first.text, second.text)
        assert first.json() == second.json()
        assert [first.headers.get("Idempotent-Replayed"), second.headers.get("Idempotent-Replayed")].count("true") == 1
        later = await client.post(f"{env.url('api')}/v1/flows", json=flow, headers=headers)
        assert later.status_code == first.status_code and later.headers["Idempotent-Replayed"] == "true"
        changed = await client.post(f"{env.url('api')}/v1/flows", json={**flow, "name": "Other"}, headers=headers)
        assert changed.status_code == 422 and changed.json()["error"]["code"] == "idempotency_key_reused"
        # Without the key the same create is a conflict: the flow exists (once).
        plain = await client.post(f"{env.url('api')}/v1/flows", json=flow, headers=auth(env.keys["t1"]))
        assert plain.status_code == 409, plain.text

        run = await client.post(_noop(env), json={"input": {"n": 7}},
                                headers=auth(env.keys["t1"]))  # fmt: skip
        run_id = run.json()["run_id"]
        await env.wait_all([run_id], "t1")
        retry_headers = auth(env.keys["t1"], **{"Idempotency-Key": f"retry-{run_id}"})
        retry = {"strategy": "ON_LATEST_VERSION"}
        answers = await asyncio.gather(*(client.post(f"{env.url('api')}/v1/runs/{run_id}/retry", json=retry,
                                                     headers=retry_headers) for _ in range(20)))  # fmt: skip
        assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
        new_ids = {a.json()["run_id"] for a in answers}
        assert len(new_ids) == 1 and run_id not in new_ids
        final = await env.wait_all(sorted(new_ids), "t1")
        assert set(final.values()) == {"SUCCEEDED"}
        listed = await client.get(f"{env.url('api')}/v1/runs", params={"flow_id": "noop", "limit": 100},
                                  headers=auth(env.keys["t1"]))  # fmt: skip
        retries = [r for r in listed.json()["data"] if r.get("trigger", {}).get("type") == "retry"
                   or r.get("trigger_type") == "retry"]  # fmt: skip
        assert len(retries) == 1, retries

        # A bulk retry whose first answer was lost (its key released, as after a 5xx) and is sent again with the same
        # key names the same new runs: each retried run gets one retry, not two.
        originals = [(await client.post(_noop(env), json={"input": {"n": i}},
                                        headers=auth(env.keys["t1"]))).json()["run_id"] for i in range(3)]  # fmt: skip
        await env.wait_all(originals, "t1")
        bulk = {"ids": originals, "strategy": "ON_LATEST_VERSION"}
        bulk_headers = auth(env.keys["t1"], **{"Idempotency-Key": "bulk-retry-1"})
        first_bulk = await client.post(f"{env.url('api')}/v1/runs/bulk/retry", json=bulk, headers=bulk_headers)
        assert first_bulk.status_code == 202, first_bulk.text
        conn = await env.db()
        try:
            await conn.execute("DELETE FROM idempotency_keys WHERE key = 'bulk-retry-1'")
        finally:
            await conn.close()
        again_bulk = await client.post(f"{env.url('api')}/v1/runs/bulk/retry", json=bulk, headers=bulk_headers)
        assert again_bulk.status_code == 202 and "Idempotent-Replayed" not in again_bulk.headers  # it ran again
        assert sorted(again_bulk.json()["new_run_ids"]) == sorted(first_bulk.json()["new_run_ids"])
        await env.wait_all(first_bulk.json()["new_run_ids"], "t1")
        for original in originals:
            listed = await client.get(f"{env.url('api')}/v1/runs", params={"retry_of": original},
                                      headers=auth(env.keys["t1"]))  # fmt: skip
            assert len(listed.json()["data"]) == 1, listed.text

        too_big = await client.post(f"{env.url('api')}/v1/flows", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                                    headers={**auth(env.keys["t1"]), "Content-Type": "application/json"})  # fmt: skip
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
        # Under the body limit but over what one Kafka message holds: refused before the flows topic, not a 5xx.
        blob = {"id": "blob", "name": "Blob", "steps": [
            {"name": "only", "action": "transform", "input": {"output": {"text": "b" * 1_030_000}}}]}  # fmt: skip
        heavy = await client.post(f"{env.url('api')}/v1/flows", json=blob, headers=auth(env.keys["t1"]))
        assert heavy.status_code == 413 and "flow definition" in heavy.json()["error"]["message"], heavy.text
        missing = await client.get(f"{env.url('api')}/v1/flows/blob", headers=auth(env.keys["t1"]))
        assert missing.status_code == 404


async def test_bad_input_with_an_idempotency_key_is_a_4xx_and_keeps_no_key(env: Env) -> None:
    """The idempotency layer reads a keyed request before the routes do: every class of bad input still gets its 4xx
    (never a 5xx or a dropped connection), and the key stays free for the corrected request."""
    headers = {**auth(env.keys["t2"]), "Idempotency-Key": "bad-input-1", "Content-Type": "application/json"}
    cases = [
        (f"{env.url('ingest')}/v1/flows/noop%00/trigger", b'{"input": {}}'),  # NUL in the path
        (_noop(env), b'{"input": {"a": "x\\u0000y"}}'),  # NUL in a JSON string
        (_noop(env), b'{"input": {"a": "\\udc00"}}'),  # a lone surrogate
        (_noop(env), b'{"input": {"n": 1' + b"0" * 40 + b"}}"),  # beyond 64 bits
        (_noop(env), b'{"input": '),  # malformed JSON
        (f"{env.url('api')}/v1/flows/x%00/pause", b"{}"),
        (f"{env.url('api')}/v1/flows", b'{"id": "a\\u0000b", "name": "n", "steps": []}'),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        for url, body in cases:
            answer = await client.post(url, content=body, headers=headers)
            assert 400 <= answer.status_code < 500, (url, body, answer.status_code, answer.text)
            assert answer.json()["error"]["code"] in ("invalid_request", "validation_error", "not_found"), answer.text
        fixed = await client.post(_noop(env), json={"input": {"n": 1}}, headers=headers)
        assert fixed.status_code == 202 and "Idempotent-Replayed" not in fixed.headers, fixed.text
