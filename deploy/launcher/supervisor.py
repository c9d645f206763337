"""A small asyncio process supervisor: start named children, restart crashed ones, stop all cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.launcher.procs import open_log
from services.common.settings import REPO_ROOT

log = logging.getLogger("flowtrail.launcher")

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    # Resolved once here, not in the forked child, where dlopen/dlsym could deadlock.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies without stopping us (Linux only)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


@dataclass
class ServiceSpec:
    """What to run: a name (also the log file name), the argv, the full environment and a folder."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None

    @classmethod
    def service(cls, name: str, env: dict[str, str]) -> ServiceSpec:
        """A Flowtrail service (`python -m services.<name>` from the repository root) with the full environment
        `env`: how `flowtrail up` and the e2e tests' stack both run one."""
        return cls(name=name, argv=[sys.executable, "-m", f"services.{name}"], env=env, cwd=REPO_ROOT)


def open_child_log(path: Path, spec: ServiceSpec) -> int:
    """Open a child's log for appending (rotated when large) and mark where this start begins; an fd to close."""
    log_fd = open_log(path)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(log_fd, f"----- {stamp} flowtrail supervisor: starting {' '.join(spec.argv)}\n".encode())
    return log_fd


def spawn_options(spec: ServiceSpec, log_fd: int) -> dict[str, Any]:
    """Keyword arguments for `asyncio.create_subprocess_exec` or `subprocess.Popen` that run `spec` as a child:
    stdout and stderr to the log, its own process group (so a stop reaches grandchildren), and SIGTERM when the
    parent dies without stopping it."""
    return {
        "stdin": subprocess.DEVNULL,
        "stdout": log_fd,
        "stderr": subprocess.STDOUT,
        "env": spec.env,
        "cwd": spec.cwd,
        "start_new_session": True,
        "preexec_fn": _die_with_parent if _prctl is not None else None,
    }


@dataclass
class _Child:
    spec: ServiceSpec
    process: asyncio.subprocess.Process | None = None
    state: str = "new"  # new, running, restarting, failed, stopped
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    restart_times: deque[float] = field(default_factory=deque)
    watcher: asyncio.Task[None] | None = None


class Supervisor:
    """Runs named child processes; each crash is logged and restarted with exponential backoff.

    A child that crashes more than ``max_restarts_per_minute`` times within a minute is given up on
    (state ``failed``). ``stop_all()`` sends SIGTERM to every child's process group, waits up to
    ``stop_timeout`` seconds, then sends SIGKILL.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        max_restarts_per_minute: int = 5,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        stop_timeout: float = 15.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.max_restarts_per_minute = max_restarts_per_minute
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_timeout = stop_timeout
        self._on_change = on_change
        self._children: dict[str, _Child] = {}
        self._stopping = asyncio.Event()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def add(self, spec: ServiceSpec) -> None:
        if spec.name in self._children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        self._children[spec.name] = _Child(spec)

    async def start_all(self) -> None:
        """Spawn every added child (in the order added) and start watching them."""
        for child in self._children.values():
            if child.watcher is None:
                await self._spawn(child)
                child.watcher = asyncio.create_task(self._watch(child), name=f"supervise-{child.spec.name}")

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("supervisor status callback failed")

    async def _spawn(self, child: _Child) -> None:
        spec = child.spec
        log_fd = open_child_log(self.log_path(spec.name), spec)
        try:
            child.process = await asyncio.create_subprocess_exec(*spec.argv, **spawn_options(spec, log_fd))
        finally:
            os.close(log_fd)
        child.state = "running"
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", spec.name, child.process.pid)
        self._changed()

    async def _watch(self, child: _Child) -> None:
        backoff = self.backoff_initial
        while True:
            assert child.process is not None
            code = await child.process.wait()
            child.last_exit = code
            if self._stopping.is_set():
                return
            ran_for = time.monotonic() - child.started_at
            log.warning(
                "%s (pid %d) exited unexpectedly with code %s after %.1f s; see %s",
                child.spec.name, child.process.pid, code, ran_for, self.log_path(child.spec.name),
            )  # fmt: skip
            now = time.monotonic()
            while child.restart_times and now - child.restart_times[0] > 60.0:
                child.restart_times.popleft()
            if len(child.restart_times) >= self.max_restarts_per_minute:
                child.state = "failed"
                log.error(
                    "%s crashed %d times within a minute; giving up on it (see %s)",
                    child.spec.name, len(child.restart_times) + 1, self.log_path(child.spec.name),
                )  # fmt: skip
                self._changed()
                return
            if ran_for > 60.0:
                backoff = self.backoff_initial
            child.state = "restarting"
            self._changed()
            log.info("restarting %s in %.1f s", child.spec.name, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
            if self._stopping.is_set():
                child.state = "stopped"
                return
            backoff = min(self.backoff_max, backoff * 2)
            child.restart_times.append(time.monotonic())
            child.restarts += 1
            try:
                await self._spawn(child)
            except OSError as exc:
                child.state = "failed"
                log.error("could not restart %s: %s", child.spec.name, exc)
                self._changed()
                return

    @staticmethod
    def _signal(process: asyncio.subprocess.Process, sig: int) -> None:
        # Each child leads its own process group; signal the group so grandchildren stop too.
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def _stop_child(self, child: _Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            child.state = "stopped" if child.state != "failed" else child.state
            return
        self._signal(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", child.spec.name, self.stop_timeout)
            self._signal(process, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=5.0)
        # Anything left in the group (a grandchild ignoring SIGTERM) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        child.state = "stopped"
        log.info("stopped %s (exit code %s)", child.spec.name, process.returncode)

    async def stop_all(self) -> None:
        """SIGTERM every child (all at once), wait up to ``stop_timeout`` s each, then SIGKILL."""
        self._stopping.set()
        await asyncio.gather(*(self._stop_child(c) for c in self._children.values()))
        for child in self._children.values():
            if child.watcher is not None:
                child.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.watcher
        self._changed()

    def is_failed(self, name: str) -> bool:
        return self._children[name].state == "failed"

    def pid(self, name: str) -> int | None:
        child = self._children[name]
        if child.process is None or child.process.returncode is not None:
            return None
        return child.process.pid

    def status(self) -> dict[str, dict[str, Any]]:
        """Per child: state, pid, restarts, last exit code and log file."""
        return {
            name: {
                "state": child.state,
                "pid": self.pid(name),
                "restarts": child.restarts,
                "last_exit": child.last_exit,
                "log": str(self.log_path(name)),
            }
            for name, child in self._children.items()
        }
