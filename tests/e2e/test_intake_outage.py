"""A broker restart under trigger load, on a private broker of this test's own (the shared one stays up).

During the outage every trigger answers 503 with Retry-After (never 500) and /readyz answers 503; once the broker is
back, every trigger succeeds again without restarting ingest: no producer is left broken (invariant 8).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deploy.launcher.kafka import kafka_jar_dir, stop_kafka
from tests.conftest import Infra
from tests.e2e.stack import free_port
from tests.harness import CutProxy, Env, private_broker, running, stop_pid, wait_until

NO_SCHEDULER = {"FLOWTRAIL_INGEST_SCHEDULER": "false"}


async def _noop_flow(env: Env) -> None:
    """Flow `noop` of tenant t1. Ingest reads flows from PostgreSQL only: no projector needed."""
    conn = await env.db()
    try:
        await conn.execute(
            "INSERT INTO flows (tenant_id, id, name, latest_version, environment, trigger_type, created_at,"
            " updated_at) VALUES ('t1', 'noop', 'No-op', 1, 'PRODUCTION', 'api', now(), now())"
        )
    finally:
        await conn.close()


async def _ready(env: Env, status: int, within: float, what: str) -> None:
    async def answers() -> bool:
        return (await env.ingest("GET", "/readyz")).status_code == status

    await wait_until(answers, within, what, every=0.2)


@pytest.fixture
async def outage_env(
    infra: Infra, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Env, Path, int, int]]:
    # The jars the shared broker uses, not a second download.
    shared = kafka_jar_dir(infra.state_dir)
    (tmp_path / "cache").mkdir()
    os.symlink(shared, kafka_jar_dir(tmp_path))
    port, controller = free_port(), free_port()
    broker = private_broker(tmp_path, port, controller)
    private = Infra(f"127.0.0.1:{port}", infra.database_url, infra.state_dir)
    try:
        async with running(private, tmp_path_factory, keys={"t1": "t1"}, services=("ingest",),
                           env={"FLOWTRAIL_KAFKA_APPEND_TIMEOUT_S": "3", **NO_SCHEDULER}) as env:  # fmt: skip
            await _noop_flow(env)
            yield env, tmp_path, port, controller
    finally:
        stop_kafka(tmp_path, timeout=20)  # whichever broker process runs on its pid file now
        broker.stop(timeout=5)


async def test_a_broker_restart_under_load_is_503_then_every_trigger_succeeds(
    outage_env: tuple[Env, Path, int, int],
) -> None:
    env, state, port, controller = outage_env
    answers: list[tuple[float, int, str, str | None]] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            r = await env.ingest("POST", "/v1/flows/noop/trigger", json={"input": {"n": i}})
            answers.append((time.monotonic(), r.status_code, r.text, r.headers.get("Retry-After")))
            await asyncio.sleep(0.02)

    loaders = [asyncio.create_task(load()) for _ in range(4)]
    try:
        await asyncio.sleep(2)
        handle = private_broker(state, port, controller)  # the running broker's handle, to stop it
        stopped_at = time.monotonic()
        await asyncio.to_thread(stop_pid, handle.pid)
        await _ready(env, 503, 30, "/readyz saying the broker is gone")
        down = (await env.ingest("GET", "/readyz")).json()
        assert down["status"] == "unavailable" and "Kafka" in down["checks"]["kafka"]
        await asyncio.sleep(4)  # triggers keep coming while the broker is away
        restarted = await asyncio.to_thread(private_broker, state, port, controller)
        restarted_at = time.monotonic()
        await _ready(env, 200, 60, "ingest ready after the broker came back")
        recovered_at = time.monotonic()
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    codes = [code for _, code, _, _ in answers]
    assert 500 not in codes, [text for _, code, text, _ in answers if code == 500][:3]
    assert set(codes) <= {202, 503}, set(codes)
    outage = [a for a in answers if stopped_at < a[0] < restarted_at]
    assert any(code == 503 for _, code, _, _ in outage), "no request saw the outage"
    for _, code, text, retry_after in answers:
        if code == 503:
            assert retry_after is not None and '"kafka_unavailable"' in text, text
    after = [code for at, code, _, _ in answers if at > recovered_at + 0.5]
    assert after and set(after) == {202}, after
    assert restarted.bootstrap == f"127.0.0.1:{port}"


async def test_ingest_starts_without_kafka_and_is_ready_once_it_answers(
    outage_env: tuple[Env, Path, int, int],
) -> None:
    env, state, port, controller = outage_env
    await asyncio.to_thread(stop_pid, private_broker(state, port, controller).pid)
    await env.stack["ingest"].restart(within=60, ready=False)  # alive at once, though the broker is away
    ready = await env.ingest("GET", "/readyz")
    assert ready.status_code == 503 and "Kafka" in ready.json()["checks"]["kafka"], ready.text
    refused = await env.ingest("POST", "/v1/flows/noop/trigger", json={"input": {"n": 1}})
    assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
    assert "nothing was appended" in refused.json()["error"]["message"]
    await asyncio.to_thread(private_broker, state, port, controller)
    await _ready(env, 200, 60, "ingest ready once the broker answers")
    accepted = await env.ingest("POST", "/v1/flows/noop/trigger", json={"input": {"n": 2}})
    assert accepted.status_code == 202, accepted.text


async def test_a_database_outage_is_503_and_triggers_succeed_after_it(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    database = httpx.URL(infra.database_url)
    proxy = CutProxy(database.port or 5432)
    await proxy.open()
    through_proxy = {"FLOWTRAIL_DATABASE_URL": str(database.copy_with(port=proxy.port)), **NO_SCHEDULER}
    try:
        async with running(infra, tmp_path_factory, keys={"t1": "t1"}, services=("ingest",), env=through_proxy) as env:

            async def trigger(n: int, **headers: str) -> httpx.Response:
                return await env.ingest("POST", "/v1/flows/noop/trigger", json={"input": {"n": n}}, headers=headers)

            await _noop_flow(env)
            assert (await trigger(0)).status_code == 202
            await proxy.cut()
            during = [await trigger(i) for i in range(10)]
            keyed = await trigger(99, **{"Idempotency-Key": "k-1"})
            ready = await env.ingest("GET", "/readyz")
            await proxy.open()
            await _ready(env, 200, 30, "ingest ready after the database came back")
            after = [await trigger(i) for i in range(10)]
    finally:
        await proxy.cut()
    for answer in [*during, keyed]:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable" and answer.headers["Retry-After"]
    assert ready.status_code == 503 and "PostgreSQL" in ready.json()["checks"]["postgres"]
    assert [a.status_code for a in after] == [202] * 10, [a.text for a in after]
