"""The chaos run's own infrastructure: a private PostgreSQL and a private broker in the run's own state folder and
ports (never the shared ones other tests use), and Flowtrail's services on them, run by the launcher's supervisor as
`flowtrail up` runs them, in a topology of the run's choosing (docs/operations.md#recovery-figures)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from deploy.launcher.kafka import ensure_kafka, ensure_kafka_jars, kafka_jar_dir, kafka_pid, stop_kafka
from deploy.launcher.postgres import find_pg_bin
from deploy.launcher.supervisor import ServiceSpec, Supervisor
from services.common.settings import REPO_ROOT
from tests.chaos.load import TENANT
from tests.conftest import STATE_DIR, Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port
from tests.e2e.test_postgres_restart import PrivateCluster, cluster_paths, run_as_cluster_owner
from tests.harness import ALL_SERVICES, make_keys

INSTANCE_ENV = {"executor": "FLOWTRAIL_EXECUTOR_INSTANCE_ID", "projector": "FLOWTRAIL_PROJECTOR_INSTANCE_ID"}


@dataclass(frozen=True)
class Topology:
    """How many of each: brokers, executor and projector processes (one ingest, one API), ledger partitions."""

    brokers: int = 1
    executors: int = 1
    projectors: int = 1
    partitions: int = 4

    def describe(self) -> str:
        return (f"{self.brokers} broker(s), {self.executors} executor(s), {self.projectors} projector(s), "
                f"1 ingest, 1 api, {self.partitions} partitions")  # fmt: skip


class PrivatePostgres(PrivateCluster):
    """The run's own PostgreSQL cluster (as tests/e2e/test_postgres_restart.py starts one), also stopped
    `-m immediate` so that it stays away for a while before its start."""

    def stop_immediate(self) -> None:
        """`pg_ctl stop -m immediate`: every backend killed at once, no checkpoint; its start replays the WAL."""
        pg_bin = find_pg_bin()
        assert pg_bin is not None
        paths = cluster_paths(self.state)
        argv = [str(pg_bin / "pg_ctl"), "-D", str(paths["data"]), "-m", "immediate", "-w", "-t", "60", "stop"]
        done = run_as_cluster_owner(argv, cwd=paths["root"], timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr


class PrivateBroker:
    """A single-node KRaft broker of the run's own, killed with SIGKILL and started again on the same data."""

    def __init__(self, state: Path, partitions: int) -> None:
        self.state = state
        self.partitions = partitions
        self.port, self.controller = free_port(), free_port()
        (state / "cache").mkdir(parents=True, exist_ok=True)
        os.symlink(ensure_kafka_jars(STATE_DIR), kafka_jar_dir(state))  # the shared jars, not a second download

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        ensure_kafka(self.state, port=self.port, controller_port=self.controller, num_partitions=self.partitions,
                     timeout=120)  # fmt: skip

    def nodes(self) -> list[int]:
        return [1]

    def start_node(self, node: int) -> None:
        self.start()

    def kill(self, node: int) -> None:
        pid = kafka_pid(self.state)
        assert pid is not None, "the chaos broker is not running"
        os.kill(pid, 9)
        with contextlib.suppress(ChildProcessError):  # our child: reaped, or the pid file would name a zombie
            os.waitpid(pid, 0)

    def stop(self) -> None:
        stop_kafka(self.state, timeout=20)


class Brokers(Protocol):
    """The run's broker nodes, one of which can be killed (SIGKILL) and started again on its data."""

    @property
    def bootstrap(self) -> str: ...

    def nodes(self) -> list[int]: ...

    def kill(self, node: int) -> None: ...

    def start_node(self, node: int) -> None: ...


@dataclass
class ChaosStack:
    """The running stack: its sandbox and API key, its supervisor, the private PostgreSQL and brokers, and each
    supervised process by name (`executor`, or `executor-1`, `executor-2`, … with several) with its service and
    URL."""

    sandbox: Sandbox
    key: str
    supervisor: Supervisor
    postgres: PrivatePostgres
    brokers: Brokers
    topology: Topology
    processes: dict[str, str] = field(default_factory=dict)  # supervised name → service
    urls: dict[str, str] = field(default_factory=dict)  # supervised name → http://127.0.0.1:<port>

    def named(self, service: str) -> list[str]:
        return [name for name, kind in self.processes.items() if kind == service]

    def url(self, service: str) -> str:
        """The URL of the service's first process."""
        return self.urls[self.named(service)[0]]

    async def until_ready(self, names: list[str], since: float, within: float) -> float:
        """Seconds from `since` until every named process answered 200 on /readyz."""
        deadline = since + within
        waiting = set(names)
        async with httpx.AsyncClient(timeout=3, trust_env=False) as client:
            while waiting:
                for name in list(waiting):
                    try:
                        if (await client.get(f"{self.urls[name]}/readyz")).status_code == 200:
                            waiting.discard(name)
                    except httpx.HTTPError:
                        pass
                if waiting:
                    assert time.monotonic() < deadline, f"{sorted(waiting)} not ready within {within} s"
                    await asyncio.sleep(0.1)
        return time.monotonic() - since


def _specs(stack: Stack, topology: Topology) -> dict[str, tuple[str, dict[str, str]]]:
    """Supervised name → (service, its environment): one ingest and one API, `executors` executors and
    `projectors` projectors, each replica on its own port with its own static-membership instance id."""
    counts = {"ingest": 1, "api": 1, "executor": topology.executors, "projector": topology.projectors}
    out: dict[str, tuple[str, dict[str, str]]] = {}
    for service in ALL_SERVICES:
        for i in range(1, counts[service] + 1):
            name = service if i == 1 else f"{service}-{i}"
            process = stack[service] if i == 1 else stack.add(service, name)
            env = {**os.environ, **process.env}
            if service in INSTANCE_ENV:
                env[INSTANCE_ENV[service]] = f"chaos-{name}"
            out[name] = (service, env)
    return out


@asynccontextmanager
async def chaos_stack(topology: Topology, state: Path, logs: Path, **extra_env: str) -> AsyncIterator[ChaosStack]:
    """Start the private PostgreSQL and broker in `state`, a sandbox on them, and every service under the
    supervisor; everything stopped on exit."""
    assert topology.brokers == 1, "more than one broker needs the cluster launcher (docs/operations.md)"
    postgres = PrivatePostgres(state / "pg")
    broker = PrivateBroker(state / "kafka", topology.partitions)
    try:
        await asyncio.gather(asyncio.to_thread(postgres.start), asyncio.to_thread(broker.start))
        infra = Infra(broker.bootstrap, postgres.dsn, STATE_DIR)
        async with make_sandbox(infra, topology.partitions) as sandbox:
            key = await sandbox_key(sandbox)
            stack = Stack.build(sandbox, ALL_SERVICES, logs, **extra_env)
            specs = _specs(stack, topology)
            supervisor = Supervisor(logs, ready_url=lambda name: f"{stack[name].url}/readyz")
            for name, (service, environment) in specs.items():
                argv = [sys.executable, "-m", f"services.{service}"]
                supervisor.add(ServiceSpec(name=name, argv=argv, env=environment, cwd=REPO_ROOT))
            await supervisor.start_all()
            try:
                yield ChaosStack(sandbox, key, supervisor, postgres, broker, topology,
                                 {name: service for name, (service, _) in specs.items()},
                                 {name: stack[name].url for name in specs})  # fmt: skip
            finally:
                await supervisor.stop_all()
    finally:
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(postgres.stop)


async def sandbox_key(sandbox: Sandbox) -> str:
    """A new API key of the load's tenant."""
    return (await make_keys(sandbox, {"a": TENANT}))["a"]
