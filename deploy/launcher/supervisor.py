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

import httpx

from deploy.launcher.procs import open_log, tail
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
    state: str = "new"  # new, starting (not ready yet), running, restarting, stopped
    restarts: int = 0
    last_exit: int | None = None
    last_exit_at: float | None = None  # wall-clock time of the last unexpected exit
    last_log: list[str] = field(default_factory=list)  # the log's last lines at that exit
    started_at: float = 0.0
    ready_after: float | None = None  # seconds from this start to its first ready answer
    backoff: float = 0.0
    crash_times: deque[float] = field(default_factory=deque)
    watcher: asyncio.Task[None] | None = None
    prober: asyncio.Task[None] | None = None


class Supervisor:
    """Runs named child processes; each crash is logged and the child restarted, forever.

    The delay before a restart starts at ``backoff_initial`` and doubles up to ``backoff_max``; it is back at
    ``backoff_initial`` once a start succeeds: the child answers 200 on its readiness URL (``ready_url(name)``;
    without one, once it has run ``stable_after`` seconds). A child that keeps failing is restarted at the cap,
    never given up on; ``status()`` says why it fails (last exit code, its log's last lines). ``stop_all()`` sends
    SIGTERM to every child's process group, waits up to ``stop_timeout`` seconds, then sends SIGKILL.
    How the same policy reads for systemd and Kubernetes: docs/operations.md.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 5.0,
        ready_url: Callable[[str], str | None] | None = None,
        stable_after: float = 10.0,
        crashing_per_minute: int = 6,
        stop_timeout: float = 15.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.ready_url = ready_url
        self.stable_after = stable_after
        self.crashing_per_minute = crashing_per_minute
        self.stop_timeout = stop_timeout
        self._on_change = on_change
        self._children: dict[str, _Child] = {}
        self._stopping = asyncio.Event()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def add(self, spec: ServiceSpec) -> None:
        if spec.name in self._children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        self._children[spec.name] = _Child(spec, backoff=self.backoff_initial)

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
        child.state = "starting"
        child.started_at = time.monotonic()
        child.ready_after = None
        log.info("started %s (pid %d)", spec.name, child.process.pid)
        child.prober = asyncio.create_task(self._probe(child, child.process), name=f"probe-{spec.name}")
        self._changed()

    async def _probe(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        """Until this start of the child answers ready: then its restart delay is back at the initial one."""
        url = self.ready_url(child.spec.name) if self.ready_url is not None else None
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while process.returncode is None:
                if url is None:
                    ready = time.monotonic() - child.started_at >= self.stable_after
                else:
                    try:
                        ready = (await client.get(url)).status_code == 200
                    except httpx.HTTPError:
                        ready = False
                if ready and process.returncode is None:
                    child.ready_after = time.monotonic() - child.started_at
                    child.backoff = self.backoff_initial
                    child.state = "running"
                    log.info("%s is ready (%.1f s after its start)", child.spec.name, child.ready_after)
                    self._changed()
                    return
                await asyncio.sleep(0.25)

    async def _watch(self, child: _Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            child.last_exit = code
            if child.prober is not None:
                child.prober.cancel()
            if self._stopping.is_set():
                return
            ran_for = time.monotonic() - child.started_at
            child.last_exit_at = time.time()
            child.last_log = tail(self.log_path(child.spec.name), 10).splitlines()
            log.warning(
                "%s (pid %d) exited unexpectedly with code %s after %.1f s; see %s",
                child.spec.name, child.process.pid, code, ran_for, self.log_path(child.spec.name),
            )  # fmt: skip
            now = time.monotonic()
            child.crash_times.append(now)
            while child.crash_times and now - child.crash_times[0] > 60.0:
                child.crash_times.popleft()
            delay = child.backoff
            child.backoff = min(self.backoff_max, child.backoff * 2)
            child.state = "restarting"
            self._changed()
            log.info("restarting %s in %.1f s", child.spec.name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            if self._stopping.is_set():
                child.state = "stopped"
                return
            child.restarts += 1
            while True:
                try:
                    await self._spawn(child)
                    break
                except OSError as exc:  # e.g. out of processes or memory: try again at the cap
                    log.error("could not restart %s: %s; trying again in %.1f s", child.spec.name, exc,
                              self.backoff_max)  # fmt: skip
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), timeout=self.backoff_max)
                    if self._stopping.is_set():
                        child.state = "stopped"
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
            child.state = "stopped"
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
            if child.prober is not None:
                child.prober.cancel()
            if child.watcher is not None:
                child.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.watcher
        self._changed()

    def is_failed(self, name: str) -> bool:
        """The child crashed ``crashing_per_minute`` times within the last minute (it is still being restarted)."""
        child = self._children[name]
        now = time.monotonic()
        return sum(1 for t in child.crash_times if now - t <= 60.0) >= self.crashing_per_minute

    def pid(self, name: str) -> int | None:
        child = self._children[name]
        if child.process is None or child.process.returncode is not None:
            return None
        return child.process.pid

    def status(self) -> dict[str, dict[str, Any]]:
        """Per child: state, pid, restarts, crashes in the last minute, last exit code, when and the log's last
        lines then, how long this start took to be ready, the next restart delay and the log file."""
        now = time.monotonic()
        return {
            name: {
                "state": child.state,
                "pid": self.pid(name),
                "restarts": child.restarts,
                "crashes_last_minute": sum(1 for t in child.crash_times if now - t <= 60.0),
                "last_exit": child.last_exit,
                "last_exit_at": child.last_exit_at,
                "last_log": child.last_log,
                "ready_after": child.ready_after,
                "backoff": child.backoff,
                "log": str(self.log_path(name)),
            }
            for name, child in self._children.items()
        }
