"""A local cluster as one object: its KRaft nodes and its supervised service replicas, started and stopped together,
one broker killed or restarted, one service killed (docs/cluster.md). `flowtrail up` and the chaos suite use it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import httpx

from deploy.launcher.brokers import KafkaCluster
from deploy.launcher.errors import LauncherError
from deploy.launcher.layout import Layout, ServiceMember
from deploy.launcher.procs import remove_file, with_log_tail
from deploy.launcher.supervisor import ServiceSpec, Supervisor
from services.common.settings import REPO_ROOT

log = logging.getLogger("flowtrail.launcher")

LAYOUT_FILE = "cluster.json"


def write_layout(state_dir: Path, layout: Layout) -> None:
    """Record the layout in <state_dir>/cluster.json, where `flowtrail status` finds every member."""
    path = Path(state_dir) / LAYOUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(layout.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def read_layout(state_dir: Path) -> Layout | None:
    try:
        return Layout.from_json(json.loads((Path(state_dir) / LAYOUT_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def member_spec(member: ServiceMember, env: Mapping[str, str]) -> ServiceSpec:
    """How the supervisor runs one replica: `python -m services.<service>` with `env` and the replica's own port and
    instance id; named after the replica (its log file too)."""
    return ServiceSpec(member.name, [sys.executable, "-m", f"services.{member.service}"],
                       {**env, **member.env()}, REPO_ROOT)  # fmt: skip


async def wait_members(
    supervisor: Supervisor, members: list[ServiceMember], *, page: str = "/healthz", within: float = 90.0
) -> None:
    """Until every member answers 200 on `page`; a LauncherError naming the first that does not, with its log."""
    pending = list(members)
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        while pending:
            for member in list(pending):
                if supervisor.is_failed(member.name):
                    raise LauncherError(
                        with_log_tail(f"{member.name} keeps crashing", supervisor.log_path(member.name))
                    )
                try:
                    if (await client.get(member.url + page)).status_code == 200:
                        log.info("%s answers %s", member.name, page)
                        pending.remove(member)
                except httpx.HTTPError:
                    pass
            if not pending:
                return
            if time.monotonic() >= deadline:
                first = pending[0]
                raise LauncherError(with_log_tail(
                    f"{first.name} did not answer 200 on {first.url}{page} within {within:.0f} s "
                    f"(also waiting: {', '.join(m.name for m in pending[1:]) or 'none'})",
                    supervisor.log_path(first.name)))  # fmt: skip
            await asyncio.sleep(0.3)


class Replicas:
    """The service replicas of `layout`, supervised (restarted after any exit) with their logs in `log_dir`."""

    def __init__(self, log_dir: Path, layout: Layout, *, on_change: Callable[[], None] | None = None) -> None:
        self.layout = layout
        # A replica's restart delay is back at its shortest once it answers ready (docs/operations.md).
        self.supervisor = Supervisor(
            log_dir, on_change=on_change, ready_url=lambda name: self.layout.member(name).url + "/readyz"
        )

    async def start(self, env: Mapping[str, str], *, page: str = "/readyz", within: float = 120.0) -> None:
        """Every replica with `env` and its own port and instance id; returns when each answers 200 on `page`."""
        for member in self.layout.members:
            self.supervisor.add(member_spec(member, env))
        await self.supervisor.start_all()
        await wait_members(self.supervisor, list(self.layout.members), page=page, within=within)

    def kill(self, name: str) -> int | None:
        """SIGKILL one replica (the supervisor starts it again); its pid, None when it was not running."""
        pid = self.supervisor.pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        return pid

    async def stop(self) -> None:
        await self.supervisor.stop_all()


class LocalCluster:
    """The brokers and service replicas of `layout`, with their files in `state_dir` (logs in <state_dir>/logs).

    ``start_brokers()``, then (once topics and schema exist, e.g. a test's sandbox) ``start_services(env)``;
    ``stop()`` or leaving ``async with`` stops the services, then the brokers this object started.
    """

    def __init__(self, state_dir: Path, layout: Layout) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.layout = layout
        self.kafka = KafkaCluster(self.state_dir, layout)
        self.replicas = Replicas(self.state_dir / "logs", layout)

    @property
    def supervisor(self) -> Supervisor:
        return self.replicas.supervisor

    @property
    def bootstrap(self) -> str:
        return self.layout.bootstrap

    def url(self, name: str) -> str:
        """http://127.0.0.1:<port> of a member (`api`, `ingest`, `executor-2`; the first replica for a service)."""
        try:
            return self.layout.member(name).url
        except KeyError:
            replicas = self.layout.of(name)
            if not replicas:
                raise
            return replicas[0].url

    async def start_brokers(self, within: float = 120.0) -> None:
        """Format (first time) and start every node; returns when each lists all of them."""
        write_layout(self.state_dir, self.layout)
        await asyncio.to_thread(self.kafka.start, within)

    async def start_services(self, env: Mapping[str, str], *, page: str = "/readyz", within: float = 120.0) -> None:
        """Every replica with `env` (FLOWTRAIL_* of the sandbox) and the brokers' bootstrap; returns when each
        answers 200 on `page`."""
        await self.replicas.start({**env, "FLOWTRAIL_KAFKA_BOOTSTRAP": self.bootstrap}, page=page, within=within)

    def kill_service(self, name: str) -> int | None:
        """SIGKILL one replica (the supervisor starts it again); its pid, None when it was not running."""
        return self.replicas.kill(name)

    def kill_broker(self, node_id: int) -> None:
        """SIGKILL one node, as a crash."""
        self.kafka.kill(node_id)

    def stop_broker(self, node_id: int, timeout: float = 30.0) -> None:
        """SIGTERM one node (controlled shutdown)."""
        self.kafka.stop_node(node_id, timeout)

    async def start_broker(self, node_id: int, within: float = 120.0) -> None:
        """Start a stopped or killed node again; returns when it lists itself."""
        await asyncio.to_thread(self.kafka.start_node, node_id, within)

    def broker_pid(self, node_id: int) -> int | None:
        return self.kafka.pid(node_id)

    async def stop(self, broker_timeout: float = 30.0) -> None:
        """Services first (they may flush to the brokers), then the brokers; safe to call twice."""
        await self.replicas.stop()
        await asyncio.to_thread(self.kafka.stop, broker_timeout)
        remove_file(self.state_dir / LAYOUT_FILE)

    async def __aenter__(self) -> LocalCluster:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
