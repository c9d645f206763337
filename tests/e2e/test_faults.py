"""Every service through faults, run by the launcher's supervisor as `flowtrail up` runs them: started while the
broker and PostgreSQL are away, each answers /healthz, says on /readyz what it waits for, refuses what it cannot
serve with 503 + Retry-After, and is ready by itself once they are back; the same when they go away while it runs;
a killed executor's runs move again within seconds (docs/operations.md). A private broker and a database proxy of
the test's own are stopped, never the shared ones."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.launcher.kafka import ensure_kafka, kafka_jar_dir, stop_kafka
from deploy.launcher.supervisor import Supervisor
from tests.conftest import Infra
from tests.e2e.stack import Service, Stack, free_port
from tests.harness import (
    ALL_SERVICES,
    SLACK,
    CutProxy,
    Env,
    flow,
    private_broker,
    publish_flows,
    running,
    stop_pid,
    supervised,
    until_ready,
    wait_flows_projected,
    wait_until,
)

FLOW = flow("tenant-a", "hello", [{"name": "only", "action": "transform", "input": {"output": {"hi": 1}}}])
# What each service's /readyz must name while the broker and PostgreSQL are both away.
WAITS_FOR = {"ingest": ("postgres", "kafka"), "api": ("postgres",), "projector": ("postgres",), "executor": ("kafka",)}


@dataclass
class Faults:
    """The running stack, its supervisor, and the two things the test breaks."""

    env: Env
    stack: Stack
    proxy: CutProxy
    state: Path
    port: int
    controller: int

    def stop_broker(self) -> None:
        stop_pid(private_broker(self.state, self.port, self.controller).pid)

    def start_broker(self) -> None:
        private_broker(self.state, self.port, self.controller)

    async def readyz(self, name: str) -> httpx.Response:
        return await self.env.http.get(f"{self.stack[name].url}/readyz", timeout=5)

    async def until_ready(self, names: tuple[str, ...], since: float, within: float) -> dict[str, float]:
        return await until_ready(self.env, names, since, within)

    async def until_healthy(self, within: float) -> None:
        async def all_alive() -> bool:
            for name in ALL_SERVICES:
                try:
                    if (await self.env.http.get(f"{self.stack[name].url}/healthz", timeout=2)).status_code != 200:
                        return False
                except httpx.TransportError:
                    return False
            return True

        await wait_until(all_alive, within, "every service answering /healthz", every=0.1, logs=self.env.log_tails)

    async def trigger(self, n: int) -> httpx.Response:
        return await self.env.ingest("POST", "/v1/flows/hello/trigger", json={"input": {"n": n}}, timeout=10)


@pytest.fixture
async def faults(infra: Infra, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Faults]:
    (tmp_path / "cache").mkdir()
    os.symlink(kafka_jar_dir(infra.state_dir), kafka_jar_dir(tmp_path))  # the shared broker's jars
    port, controller = free_port(), free_port()
    broker = ensure_kafka(tmp_path, port=port, controller_port=controller, num_partitions=2, timeout=90)
    database = httpx.URL(infra.database_url)
    proxy = CutProxy(database.port or 5432)
    await proxy.open()
    private = Infra(f"127.0.0.1:{port}", infra.database_url, infra.state_dir)
    try:
        async with running(private, tmp_path_factory, services=()) as env:
            stack = Stack.build(env.sandbox, ALL_SERVICES, tmp_path_factory.mktemp("logs"),
                                FLOWTRAIL_DATABASE_URL=str(database.copy_with(port=proxy.port)),
                                FLOWTRAIL_INGEST_SCHEDULER="false", FLOWTRAIL_KAFKA_APPEND_TIMEOUT_S="3",
                                FLOWTRAIL_EXECUTOR_SESSION_TIMEOUT_S="6")  # fmt: skip
            env.stack = stack
            yield Faults(env, stack, proxy, tmp_path, port, controller)
    finally:
        await proxy.cut()
        stop_kafka(tmp_path, timeout=20)
        broker.stop(timeout=5)


async def _serves_a_run(f: Faults, n: int, within: float = 30) -> None:
    answer = await f.trigger(n)
    assert answer.status_code == 202, answer.text
    await f.env.wait_status(answer.json()["run_id"], {"SUCCEEDED"}, within=within)


async def test_every_service_starts_without_broker_and_database_and_is_ready_once_they_are_back(
    faults: Faults,
) -> None:
    f = faults
    await asyncio.to_thread(f.stop_broker)
    await f.proxy.cut()
    async with supervised(f.stack) as supervisor:
        await f.until_healthy(60)
        for name, needs in WAITS_FOR.items():
            answer = await f.readyz(name)
            assert answer.status_code == 503, (name, answer.text)
            for need in needs:
                assert answer.json()["checks"][need] != "ok", (name, answer.text)
        refused = [await f.trigger(1), await f.env.api("GET", "/v1/runs", timeout=10)]
        for answer in refused:
            assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
            assert answer.json()["error"]["code"] == "database_unavailable", answer.text
        await asyncio.sleep(3)
        assert _restarts(supervisor) == dict.fromkeys(ALL_SERVICES, 0)

        await f.proxy.open()
        database_back = time.monotonic()
        api = await f.until_ready(("api",), database_back, 5 * SLACK)
        await asyncio.to_thread(f.start_broker)
        broker_back = time.monotonic()
        ready = await f.until_ready(("ingest", "projector", "executor"), broker_back, 30)
        print(f"\nready after PostgreSQL: {api}; after the broker: {ready}")
        assert ready["ingest"] <= 5 * SLACK, ready
        await publish_flows(f.env.sandbox, [FLOW])
        await wait_flows_projected(f.env.sandbox, 1)
        await _serves_a_run(f, 2)
        assert _restarts(supervisor) == dict.fromkeys(ALL_SERVICES, 0)


async def test_every_service_rides_out_a_broker_outage_and_a_database_stop_while_running(faults: Faults) -> None:
    f = faults
    async with supervised(f.stack) as supervisor:
        await f.until_ready(ALL_SERVICES, time.monotonic(), 90)
        await publish_flows(f.env.sandbox, [FLOW])
        await wait_flows_projected(f.env.sandbox, 1)
        await _serves_a_run(f, 0)

        await asyncio.to_thread(f.stop_broker)
        during: list[httpx.Response] = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            during.append(await f.trigger(1))
        not_ready = {name: (await f.readyz(name)).status_code for name in ("ingest", "executor", "projector")}
        await asyncio.to_thread(f.start_broker)
        broker_back = time.monotonic()
        accepted, intake_back = await _first_accepted(f, broker_back, 30)
        await f.env.wait_status(accepted, {"SUCCEEDED"}, within=60)
        ready = await f.until_ready(ALL_SERVICES, broker_back, 60)

        await f.proxy.cut()
        refused = [await f.env.api("GET", "/v1/runs", timeout=10), await f.trigger(2)]
        projector_waits = await f.readyz("projector")
        await asyncio.sleep(3)
        await f.proxy.open()
        database_back = time.monotonic()
        after_db = await f.until_ready(("api", "projector", "ingest"), database_back, 30)
        await _serves_a_run(f, 3)
        restarts = _restarts(supervisor)
    print(f"\nafter the broker: intake {intake_back:.1f} s, ready {ready}; after PostgreSQL: {after_db}; "
          f"restarts {restarts}")  # fmt: skip
    codes = {answer.status_code for answer in during}
    assert codes <= {202, 503}, [a.text for a in during if a.status_code not in (202, 503)][:3]
    assert 503 in codes and all(a.headers.get("Retry-After") for a in during if a.status_code == 503)
    assert set(not_ready.values()) == {503}, not_ready
    assert intake_back <= 5 * SLACK, intake_back
    for answer in refused:
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
        assert answer.json()["error"]["code"] == "database_unavailable", answer.text
    assert projector_waits.status_code == 503 and "PostgreSQL" in projector_waits.json()["checks"]["postgres"]
    assert max(after_db["api"], after_db["projector"]) <= 5 * SLACK, after_db
    assert restarts["api"] == restarts["ingest"] == restarts["projector"] == 0, restarts


async def _first_accepted(f: Faults, since: float, within: float) -> tuple[str, float]:
    """Triggers until one is accepted: its run id, and how long after `since` it came."""
    deadline = time.monotonic() + within
    n = 100
    while True:
        n += 1
        answer = await f.trigger(n)
        if answer.status_code == 202:
            return str(answer.json()["run_id"]), time.monotonic() - since
        assert answer.status_code == 503, answer.text
        assert time.monotonic() < deadline, answer.text
        await asyncio.sleep(0.1)


def _restarts(supervisor: Supervisor) -> dict[str, int]:
    return {n: s["restarts"] for n, s in supervisor.status().items()}


async def test_a_killed_executors_runs_move_again_within_seconds(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with running(infra, tmp_path_factory, services=()) as env:
        # The default session (10 s): the killed member is back before it would have expired (static membership).
        env.stack = Stack.build(env.sandbox, ALL_SERVICES, tmp_path_factory.mktemp("logs"),
                                FLOWTRAIL_INGEST_SCHEDULER="false")  # fmt: skip
        async with supervised(env.stack) as supervisor:
            await until_ready(env, ALL_SERVICES, time.monotonic(), 120)
            await publish_flows(env.sandbox, [FLOW])
            await wait_flows_projected(env.sandbox, 1, within=90)
            await env.wait_status(await env.trigger("hello", {"n": 0}), {"SUCCEEDED"}, within=60)
            triggered: list[tuple[float, str]] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    triggered.append((time.monotonic(), await env.trigger("hello", {"n": len(triggered)})))
                    await asyncio.sleep(0.2)

            loader = asyncio.create_task(load())
            await asyncio.sleep(2)
            pid = supervisor.pid("executor")
            assert pid is not None
            killed_at = time.monotonic()
            os.kill(pid, 9)

            async def triggered_since_kill() -> str | None:
                return next((run_id for at, run_id in triggered if at > killed_at), None)

            after_kill = await wait_until(triggered_since_kill, 10, "a trigger after the kill")
            await env.wait_status(after_kill, {"SUCCEEDED"}, within=60)
            next_final = time.monotonic() - killed_at
            await asyncio.sleep(1)
            stop.set()
            await loader
            outcome = await env.wait_all([run_id for _, run_id in triggered], within=120)
            executor = supervisor.status()["executor"]
    print(f"\nexecutor kill -> next run final {next_final:.1f} s; /readyz {executor['ready_after']:.1f} s after its "
          f"restart; {len(triggered)} runs under load")  # fmt: skip
    assert executor["restarts"] == 1 and executor["ready_after"] is not None
    assert executor["ready_after"] <= 5 * SLACK, executor
    assert next_final <= 15 * SLACK, next_final
    assert set(outcome.values()) == {"SUCCEEDED"}, outcome


async def test_a_restarted_executor_answers_its_probes_at_once_and_never_stops_answering(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The probes answer while faust and the engine are still being imported (seconds on a loaded machine: the
    figure to ready is test_a_killed_executors_runs_move_again_within_seconds's), and the port never stops answering
    when the worker's web server takes it over."""
    async with running(infra, tmp_path_factory, services=("executor",)) as env:
        executor = env.stack["executor"]
        await until_ready(env, ("executor",), time.monotonic(), 90)
        starts = [await _start_watched(env, executor) for _ in range(3)]
    print("\nexecutor start -> first /readyz answer " + ", ".join(f"{s.answered:.2f}" for s in starts)
          + " s; -> ready " + ", ".join(f"{s.ready:.2f}" for s in starts) + " s")  # fmt: skip
    for start in starts:
        assert start.first.status_code == 503 and start.first.headers["Retry-After"], start.first.text
        assert start.first.json()["checks"]["worker"].startswith("starting"), start.first.text
        assert start.healthz == 200
        assert start.refused_after_first == 0, start
        # Seconds on an idle machine, tens under heavy load: before the worker is half-way to ready, whatever the load.
        assert start.answered < start.ready / 2, start


@dataclass
class _Start:
    first: httpx.Response  # the first answer on /readyz
    answered: float  # seconds from the start to it
    ready: float  # seconds from the start to the first 200
    healthz: int  # /healthz right after the first /readyz answer
    refused_after_first: int  # probes refused between the first answer and ready: the port stopped answering


async def _start_watched(env: Env, executor: Service) -> _Start:
    """Kill -9 and start the executor, probing /readyz every 20 ms until it is ready."""
    executor.kill()
    started = time.monotonic()
    executor.start()
    first: httpx.Response | None = None
    answered = 0.0
    healthz = refused = 0
    while True:
        assert time.monotonic() - started < 60, env.log_tails()
        try:
            answer = await env.http.get(f"{executor.url}/readyz", timeout=5)
        except httpx.TransportError:
            refused += first is not None
            await asyncio.sleep(0.02)
            continue
        if first is None:
            first, answered = answer, time.monotonic() - started
            healthz = (await env.http.get(f"{executor.url}/healthz", timeout=5)).status_code
        if answer.status_code == 200:
            return _Start(first, answered, time.monotonic() - started, healthz, refused)
        await asyncio.sleep(0.02)
