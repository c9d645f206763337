"""Starts Flowtrail's services as real processes pointed at one test sandbox, on free ports, the way the launcher
starts them (deploy/launcher/supervisor.py: the same command, log file and process group) but one process each,
never restarted, so a test can kill one with SIGKILL and start it again itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.launcher.layout import free_ports
from deploy.launcher.supervisor import ServiceSpec, open_child_log, spawn_options
from tests.conftest import Sandbox

PORT_ENV = {
    "ingest": "FLOWTRAIL_INGEST_PORT",
    "executor": "FLOWTRAIL_EXECUTOR_WEB_PORT",
    "projector": "FLOWTRAIL_PROJECTOR_HTTP_PORT",
    "api": "FLOWTRAIL_API_PORT",
}


def free_port() -> int:
    """A port nothing listens on, below the ephemeral range (deploy/launcher/layout.py, free_ports)."""
    return free_ports(1)[0]


@dataclass
class Service:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        spec = ServiceSpec.service(self.name, {**os.environ, **self.env})
        log_fd = open_child_log(self.log_path, spec)
        try:
            self.process = subprocess.Popen(spec.argv, **spawn_options(spec, log_fd))
        finally:
            os.close(log_fd)

    async def wait_healthy(self, within: float = 60.0, *, ready: bool = True) -> None:
        """Until the service answers 200 on /readyz (its dependencies reached, an executor's partitions assigned and
        replayed), or on /healthz (alive: the process answers) with `ready=False`, as for a start without the broker.
        The executor answers /healthz from its first moments, before faust is even imported."""
        probe = "/readyz" if ready else "/healthz"
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.url}{probe}")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} not answering {probe} after {within}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def restart(self, within: float = 60.0, *, ready: bool = True) -> None:
        """Killed (SIGKILL) if running, started again, ready (or only alive, `ready=False`)."""
        self.kill()
        self.start()
        await self.wait_healthy(within, ready=ready)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@dataclass
class Stack:
    sandbox: Sandbox
    services: dict[str, Service] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # what every service gets, but its own port
    log_dir: Path = Path()

    @classmethod
    def build(cls, sandbox: Sandbox, names: tuple[str, ...], log_dir: Path, **extra_env: str) -> Stack:
        ports = {name: free_port() for name in names}
        env = {
            **sandbox.env(),
            "FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS": "true",
            "PYTHONUNBUFFERED": "1",
            # Rate limits stay on (their cost shows in benchmarks) but never bind unless a test sets its own.
            **{
                f"FLOWTRAIL_{service}_RATE_LIMIT_{kind}": "1000000000"
                for service in ("API", "INGEST")
                for kind in ("READS", "WRITES", "TRIGGERS")
            },
            **{PORT_ENV[n]: str(p) for n, p in ports.items()},
            **extra_env,
        }
        services = {n: Service(n, ports[n], env, log_dir / f"{n}.log") for n in names}
        return cls(sandbox, services, env, log_dir)

    def add(self, name: str, key: str) -> Service:
        """One more process of service `name` on a free port, not started, known as `key`: a second replica, or a
        service started after the others."""
        port = free_port()
        self.services[key] = Service(name, port, {**self.env, PORT_ENV[name]: str(port)}, self.log_dir / f"{key}.log")
        return self.services[key]

    async def start(self, *names: str) -> None:
        """Start the services named (default: every one) and wait until each is ready."""
        chosen = [self.services[n] for n in names] if names else list(self.services.values())
        for service in chosen:
            service.start()
        await asyncio.gather(*(s.wait_healthy() for s in chosen))

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    def __getitem__(self, name: str) -> Service:
        return self.services[name]
