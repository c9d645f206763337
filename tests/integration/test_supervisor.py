"""The launcher's supervisor keeps a crashing service alive: short restart delays, back at the shortest once a start
is ready, capped low, never given up on; `flowtrail status` says why it keeps failing (docs/operations.md)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from deploy.launcher.status import render_status
from deploy.launcher.supervisor import ServiceSpec, Supervisor
from tests.e2e.stack import free_port

# A tiny service: answers 200 on any GET (its readiness) after `ready_in` s, exits with code 3 after `live_for` s.
SCRIPT = """
import http.server, os, sys, threading, time
port, ready_in, live_for = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
if ready_in < live_for:
    time.sleep(ready_in)
    server = http.server.HTTPServer(("127.0.0.1", port), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(max(0.0, live_for - ready_in))
print("crashing on purpose: the upstream said no", flush=True)
os._exit(3)
"""


def _service(port: int, ready_in: float, live_for: float) -> ServiceSpec:
    return ServiceSpec("flaky", [sys.executable, "-c", SCRIPT, str(port), str(ready_in), str(live_for)])


async def _until(check: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_service_that_crashes_ten_times_in_a_minute_is_still_restarted(tmp_path: Path) -> None:
    port = free_port()
    supervisor = Supervisor(tmp_path, ready_url=lambda name: f"http://127.0.0.1:{port}/readyz")
    supervisor.add(_service(port, ready_in=0.2, live_for=1.0))
    began = time.monotonic()
    await supervisor.start_all()
    try:
        await _until(lambda: supervisor.status()["flaky"]["restarts"] >= 10, 60, "10 restarts within a minute")
        crashed_ten_times_in = time.monotonic() - began
        # Every start was ready before it crashed, so every restart came after the shortest delay.
        assert supervisor.status()["flaky"]["backoff"] <= 1.0
        await _until(lambda: supervisor.pid("flaky") is not None, 10, "the 11th start running")
        status = supervisor.status()["flaky"]
    finally:
        await supervisor.stop_all()
    assert crashed_ten_times_in < 60, crashed_ten_times_in
    assert status["crashes_last_minute"] >= 10 and status["last_exit"] == 3
    assert status["state"] in ("starting", "running"), status


async def test_a_service_never_ready_is_restarted_at_the_cap_and_status_says_why(tmp_path: Path) -> None:
    port = free_port()
    supervisor = Supervisor(tmp_path, ready_url=lambda name: f"http://127.0.0.1:{port}/readyz")
    supervisor.add(_service(port, ready_in=1.0, live_for=0.0))  # exits at once, never ready
    await supervisor.start_all()
    gaps: list[float] = []
    try:
        # The old policy gave up after six crashes within a minute; eight must come and be restarted.
        last_pid, last_change = supervisor.pid("flaky"), time.monotonic()
        deadline = time.monotonic() + 60
        while supervisor.status()["flaky"]["restarts"] < 8:
            assert time.monotonic() < deadline, supervisor.status()
            pid = supervisor.pid("flaky")
            if pid is not None and pid != last_pid:
                gaps.append(time.monotonic() - last_change)
                last_pid, last_change = pid, time.monotonic()
            await asyncio.sleep(0.02)
        status = supervisor.status()["flaky"]
        keeps_crashing = supervisor.is_failed("flaky")
    finally:
        await supervisor.stop_all()
    assert status["backoff"] == 5.0 and max(gaps) < 5.0 + 2.0, (status, gaps)  # the cap, plus the start itself
    assert keeps_crashing and status["last_exit"] == 3
    assert any("crashing on purpose" in line for line in status["last_log"]), status["last_log"]
    shown = render_status({
        "state_dir": str(tmp_path), "supervisor_pid": None, "consumer_lag": {}, "api_key_present": False,
        "components": {"flaky": {"up": False, "address": f"http://127.0.0.1:{port}/healthz", **status}},
    })  # fmt: skip
    assert "last exit: code 3" in shown and "crashing on purpose: the upstream said no" in shown, shown
    assert f"{status['restarts']} restarts" in shown, shown
