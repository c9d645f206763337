"""A real Redis for the redis_get / redis_set tests (docs/flows.md): Debian's `redis-server`, installed with apt-get
when missing (as tests/browser.py installs chromium), started once per test session on a free loopback port with its
own directory and a password. A test that cannot get it fails, it does not skip."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.launcher.layout import free_ports
from tests.debian import debian_binary

REDIS_SERVER = Path("/usr/bin/redis-server")
PASSWORD = "redis-pass-not-shown"


@dataclass(frozen=True)
class RedisServer:
    port: int
    password: str

    def url(self, password: str | None = None, db: int = 0) -> str:
        """`redis://` URL of this server with `password` (the right one when not given)."""
        secret = self.password if password is None else password
        return f"redis://:{secret}@127.0.0.1:{self.port}/{db}"


def redis_server_binary() -> Path:
    """Debian's redis-server, installed with `apt-get install redis-server` when it is missing and we are root."""
    return debian_binary(REDIS_SERVER, "redis-server")


def _free_port() -> int:
    return free_ports(1)[0]  # below the ephemeral range: see deploy/launcher/layout.py


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """redis-server on 127.0.0.1, no persistence, in a directory of its own; stopped at the end of the block."""
    binary = redis_server_binary()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="flowtrail-redis-") as workdir:
        argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "",
                "--appendonly", "no", "--requirepass", PASSWORD, "--daemonize", "no",
                "--logfile", str(Path(workdir) / "redis.log")]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = Path(workdir, "redis.log")
                        raise AssertionError(f"redis-server did not start on port {port}: "
                                             f"{log.read_text() if log.exists() else ''}") from None  # fmt: skip
                    time.sleep(0.05)
            yield RedisServer(port=port, password=PASSWORD)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
