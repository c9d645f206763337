"""A real PostgreSQL restart under trigger load, on a cluster of this test's own (its own data folder and port; the
shared server stays up): `pg_ctl restart -m immediate` kills every backend at once and replays the WAL at start,
as after a crash, while the services run under the launcher's supervisor. No request answers 500 (503 with
Retry-After while the server is away), the projector and the API are ready within seconds of its return with no
restart, every accepted run ends and is visible, and `flowtrail projector verify` is equal (docs/operations.md)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from deploy.launcher.postgres import _paths as cluster_paths
from deploy.launcher.postgres import _run as run_as_cluster_owner
from deploy.launcher.postgres import ensure_postgres, find_pg_bin, postgres_pid, stop_postgres
from tests.conftest import Infra
from tests.e2e.stack import Stack, free_port
from tests.harness import (
    ALL_SERVICES,
    SLACK,
    Env,
    assert_verify_equal,
    flow,
    make_keys,
    publish_flows,
    running,
    supervised,
    until_ready,
    wait_flows_projected,
)

FLOW = flow("tenant-a", "hello", [{"name": "only", "action": "transform", "input": {"output": {"hi": 1}}}])


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster in `<state>/postgres/data` on a free port, started as the launcher starts one."""

    state: Path
    port: int = field(default_factory=free_port)
    dsn: str = ""

    def start(self) -> None:
        self.dsn = ensure_postgres(self.state, port=self.port).dsn

    def restart_immediate(self) -> None:
        """`pg_ctl restart -m immediate`, returning once the server accepts connections again."""
        pg_bin = find_pg_bin()
        assert pg_bin is not None
        paths = cluster_paths(self.state)
        argv = [str(pg_bin / "pg_ctl"), "-D", str(paths["data"]), "-l", str(paths["log"]), "-m", "immediate",
                "-w", "-t", "60", "restart"]  # fmt: skip
        done = run_as_cluster_owner(argv, cwd=paths["root"], timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr

    def pid(self) -> int | None:
        return postgres_pid(self.state)

    def stop(self) -> None:
        stop_postgres(self.state, timeout=30)


@pytest.fixture
async def cluster() -> AsyncIterator[PrivateCluster]:
    # Not under pytest's tmp_path: the server runs as user postgres, who must reach its folder, and every pytest
    # session (other tests run beside this one) makes /tmp/pytest-of-<user> private again.
    state = Path(tempfile.mkdtemp(prefix="flowtrail-pg-"))
    private = PrivateCluster(state)
    try:
        await asyncio.to_thread(private.start)
        yield private
    finally:
        await asyncio.to_thread(private.stop)
        shutil.rmtree(state, ignore_errors=True)


@dataclass
class Load:
    """Triggers every 50 ms and a runs page every 100 ms, each answer kept with when it came."""

    env: Env
    triggers: list[tuple[float, httpx.Response]] = field(default_factory=list)
    reads: list[tuple[float, httpx.Response]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Keys used once each: a key seen for the first time is looked up in PostgreSQL, not in the 5 s key cache.
    fresh_keys: list[str] = field(default_factory=list)

    async def run(self) -> None:
        await asyncio.gather(self._trigger(), self._read())

    async def _trigger(self) -> None:
        """Each kind of trigger request in turn: without an Idempotency-Key and with one (its middleware looks the
        bearer key up before the route runs), at ingest's base URL and at the API's, with a known key and with one
        used for the first time."""
        while not self.stop.is_set():
            n = len(self.triggers)
            service = self.env.ingest if n % 4 < 2 else self.env.api
            headers = {"Idempotency-Key": f"pg-restart-{n}"} if n % 2 else {}
            key = self.fresh_keys.pop() if n % 3 == 0 and self.fresh_keys else None
            answer = await service("POST", "/v1/flows/hello/trigger", key, json={"input": {"n": n}}, headers=headers,
                                   timeout=10)  # fmt: skip
            self.triggers.append((time.monotonic(), answer))
            await asyncio.sleep(0.05)

    async def _read(self) -> None:
        while not self.stop.is_set():
            self.reads.append((time.monotonic(), await self.env.api("GET", "/v1/runs?limit=5", timeout=10)))
            await asyncio.sleep(0.1)

    def accepted(self) -> list[str]:
        return [str(answer.json()["run_id"]) for _, answer in self.triggers if answer.status_code == 202]


async def test_a_postgres_restart_under_load_is_503_at_most_and_every_accepted_run_ends(
    infra: Infra, cluster: PrivateCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    private = Infra(infra.kafka_bootstrap, cluster.dsn, infra.state_dir)
    async with running(private, tmp_path_factory, services=()) as env:
        env.stack = Stack.build(env.sandbox, ALL_SERVICES, tmp_path_factory.mktemp("logs"),
                                FLOWTRAIL_INGEST_SCHEDULER="false")  # fmt: skip
        async with supervised(env.stack) as supervisor:
            await until_ready(env, ALL_SERVICES, time.monotonic(), 120)
            await publish_flows(env.sandbox, [FLOW])
            await wait_flows_projected(env.sandbox, 1, within=90)
            fresh = await make_keys(env.sandbox, {f"fresh-{i}": "tenant-a" for i in range(300)})
            load = Load(env, fresh_keys=list(fresh.values()))
            loader = asyncio.create_task(load.run())
            try:
                await asyncio.sleep(2)
                before = cluster.pid()
                restarting = time.monotonic()
                await asyncio.to_thread(cluster.restart_immediate)
                back = time.monotonic()
                ready = await until_ready(env, ("projector", "api", "ingest"), back, 60)
                await asyncio.sleep(3)  # triggers and reads go on after every service is ready
            finally:
                load.stop.set()
                await loader
            accepted = load.accepted()
            outcome = await env.wait_all(accepted, within=120)
            restarts = {name: status["restarts"] for name, status in supervisor.status().items()}
            await assert_verify_equal(env.sandbox)
    refused = [(at, a) for at, a in load.triggers + load.reads if a.status_code == 503]
    print(f"\nPostgreSQL restarted in {back - restarting:.1f} s; ready after it {ready}; {len(accepted)} of "
          f"{len(load.triggers)} triggers accepted, {len(refused)} answers 503; restarts {restarts}")  # fmt: skip
    assert cluster.pid() not in (None, before), "the server was not restarted"
    answers = load.triggers + load.reads
    assert {a.status_code for _, a in answers} <= {200, 202, 503}, [
        a.text for _, a in answers if a.status_code not in (200, 202, 503)
    ][:3]
    for _, answer in refused:
        assert answer.headers.get("Retry-After") and answer.json()["error"]["code"] == "database_unavailable", (
            answer.text
        )
    late = [answer.text for at, answer in refused if at > back + max(ready.values()) + 0.5]
    assert not late, f"503 after every service was ready again: {late[:3]}"
    assert max(ready["projector"], ready["api"]) <= 5 * SLACK, ready
    assert accepted and set(outcome.values()) == {"SUCCEEDED"}, outcome
    assert restarts == dict.fromkeys(ALL_SERVICES, 0), restarts
