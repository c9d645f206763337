"""`make chaos`: the whole stack under trigger load, supervised as `flowtrail up` runs it, while kill -9 hits the
executor, the projector and ingest, the broker goes away for 20 s and PostgreSQL's connections are cut (a restart,
seen from the services); then every accepted run must end and `verify` be equal. Prints p50/p99 recovery figures
and writes them to .state/chaos/latest.json (docs/operations.md).

Not collected by `make test` (the file name is not test_*); a small variant of its executor kill runs in
tests/e2e/test_faults.py. Scale: FLOWTRAIL_CHAOS_KILLS kills of each service (5), FLOWTRAIL_CHAOS_RATE triggers/s
(20), FLOWTRAIL_CHAOS_BROKER_OUTAGE_S (20), FLOWTRAIL_CHAOS_DATABASE_OUTAGE_S (10)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

from deploy.launcher.supervisor import Supervisor
from tests.e2e.test_faults import FLOW, Faults, faults, supervised  # noqa: F401 (faults is the fixture)
from tests.harness import ALL_SERVICES, TERMINAL, assert_verify_equal, publish_flows, wait_flows_projected

KILLS = int(os.environ.get("FLOWTRAIL_CHAOS_KILLS", "5"))
RATE = float(os.environ.get("FLOWTRAIL_CHAOS_RATE", "20"))
BROKER_OUTAGE_S = float(os.environ.get("FLOWTRAIL_CHAOS_BROKER_OUTAGE_S", "20"))
DATABASE_OUTAGE_S = float(os.environ.get("FLOWTRAIL_CHAOS_DATABASE_OUTAGE_S", "10"))
REPORT = Path(os.environ.get("FLOWTRAIL_STATE_DIR", ".state")) / "chaos" / "latest.json"


class Load:
    """Triggers at RATE per second; each answer's time and status, and the accepted run ids in order."""

    def __init__(self, f: Faults) -> None:
        self.f = f
        self.answers: list[tuple[float, int]] = []
        self.accepted: list[tuple[float, str]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            began = time.monotonic()
            try:
                answer = await self.f.trigger(n)
                status = answer.status_code
                if status == 202:
                    self.accepted.append((began, str(answer.json()["run_id"])))
            except Exception:  # ingest killed mid-request: the client sees no answer
                status = 0
            self.answers.append((began, status))
            await asyncio.sleep(max(0.0, 1 / RATE - (time.monotonic() - began)))

    async def first_accepted_after(self, at: float, within: float = 120) -> float:
        """Seconds from `at` until a trigger sent after it was accepted."""
        deadline = time.monotonic() + within
        while True:
            sent = [t for t, status in self.answers if t > at and status == 202]
            if sent:
                return sent[0] - at
            assert time.monotonic() < deadline, f"no trigger accepted within {within} s"
            await asyncio.sleep(0.05)

    async def next_run_final_after(self, at: float, within: float = 120) -> float:
        """Seconds from `at` until the first run accepted after it was final (seen through the API)."""
        deadline = time.monotonic() + within
        while True:
            later = [run_id for t, run_id in self.accepted if t > at]
            if later:
                run = await self.f.env.run(later[0])
                if run is not None and run["status"] in TERMINAL:
                    return time.monotonic() - at
            assert time.monotonic() < deadline, f"no run accepted after the fault was final within {within} s"
            await asyncio.sleep(0.05)


async def _kill(supervisor: Supervisor, name: str) -> float:
    pid = supervisor.pid(name)
    while pid is None:  # still restarting from the last fault
        await asyncio.sleep(0.1)
        pid = supervisor.pid(name)
    os.kill(pid, 9)
    return time.monotonic()


async def _ready_after(supervisor: Supervisor, name: str, within: float = 60) -> float:
    """Seconds from the service's last start until it answered ready (as the supervisor saw it)."""
    deadline = time.monotonic() + within
    while (ready_after := supervisor.status()[name]["ready_after"]) is None:
        assert time.monotonic() < deadline, f"{name} not ready within {within} s of its restart"
        await asyncio.sleep(0.05)
    return float(ready_after)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 2), "p99": round(p99, 2),
            "max": round(ordered[-1], 2)}  # fmt: skip


async def test_chaos(faults: Faults) -> None:  # noqa: F811 (the fixture imported above)
    f = faults
    figures: dict[str, list[float]] = defaultdict(list)
    async with supervised(f.stack) as supervisor:
        await f.until_ready(ALL_SERVICES, time.monotonic(), 120)
        await publish_flows(f.env.sandbox, [FLOW])
        await wait_flows_projected(f.env.sandbox, 1)
        load = Load(f)
        loader = asyncio.create_task(load.run())
        try:
            await asyncio.sleep(3)
            for _ in range(KILLS):
                killed = await _kill(supervisor, "executor")
                figures["executor kill → next run final (s)"].append(await load.next_run_final_after(killed))
                figures["executor kill → /readyz after its restart (s)"].append(
                    await _ready_after(supervisor, "executor")
                )
                killed = await _kill(supervisor, "projector")
                figures["projector kill → /readyz (s)"].append((await f.until_ready(("projector",), killed, 60))
                                                               ["projector"])  # fmt: skip
                figures["projector kill → next run final (s)"].append(await load.next_run_final_after(killed))
                killed = await _kill(supervisor, "ingest")
                figures["ingest kill → trigger intake (s)"].append(await load.first_accepted_after(killed))
                await asyncio.sleep(1)
            await asyncio.to_thread(f.stop_broker)
            await asyncio.sleep(BROKER_OUTAGE_S)
            await asyncio.to_thread(f.start_broker)
            back = time.monotonic()
            figures["broker back → trigger intake (s)"].append(await load.first_accepted_after(back))
            figures["broker back → next run final (s)"].append(await load.next_run_final_after(back))
            figures["broker back → every service ready (s)"].append(
                max((await f.until_ready(ALL_SERVICES, back, 120)).values())
            )
            await f.proxy.cut()
            await asyncio.sleep(DATABASE_OUTAGE_S)
            await f.proxy.open()
            back = time.monotonic()
            ready = await f.until_ready(("projector", "api"), back, 60)
            figures["PostgreSQL back → projector and API ready (s)"].append(max(ready.values()))
            figures["PostgreSQL back → next run final (s)"].append(await load.next_run_final_after(back))
            await asyncio.sleep(3)
        finally:
            load.stop.set()
            await loader
        final = await f.env.wait_all([run_id for _, run_id in load.accepted], within=300)
        restarts = {name: info["restarts"] for name, info in supervisor.status().items()}
    await assert_verify_equal(f.env.sandbox)
    codes = Counter(status for _, status in load.answers)
    summaries = {what: _summary(samples) for what, samples in figures.items()}
    report = {
        "figures": summaries,
        "triggers": {"sent": len(load.answers), "answers": dict(codes), "runs": len(final),
                     "final": dict(Counter(final.values()))},
        "restarts": restarts, "verify": "equal",
        "settings": {"kills": KILLS, "rate": RATE, "broker_outage_s": BROKER_OUTAGE_S,
                     "database_outage_s": DATABASE_OUTAGE_S},
    }  # fmt: skip
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print("\nchaos run: recovery figures (seconds)")
    for what, summary in summaries.items():
        print(f"  {what:<50} p50 {summary['p50']:>6}  p99 {summary['p99']:>6}  (n={summary['n']})")
    print(f"  triggers {report['triggers']}; restarts {restarts}; verify equal; {REPORT}")
    assert set(final.values()) == {"SUCCEEDED"}, report["triggers"]
    assert 500 not in codes, dict(codes)
