"""Starts Flowtrail's services as real processes pointed at one test sandbox, on free ports."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common.settings import REPO_ROOT
from tests.conftest import Sandbox

PORT_ENV = {
    "ingest": "FLOWTRAIL_INGEST_PORT",
    "executor": "FLOWTRAIL_EXECUTOR_WEB_PORT",
    "projector": "FLOWTRAIL_PROJECTOR_HTTP_PORT",
    "api": "FLOWTRAIL_API_PORT",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_healthy(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} not healthy after {within}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

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
        return cls(sandbox, {n: Service(n, ports[n], env, log_dir / f"{n}.log") for n in names})

    async def start(self) -> None:
        for service in self.services.values():
            service.start()
        await asyncio.gather(*(s.wait_healthy() for s in self.services.values()))

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    def __getitem__(self, name: str) -> Service:
        return self.services[name]
