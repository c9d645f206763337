"""The faults a chaos run lands, one after another in a seeded random order spread over the load: kill -9 of a
service process (executor, projector, ingest, API), the broker killed and started again, PostgreSQL stopped
`-m immediate` and started again, a service SIGSTOPped and continued. Each is timed from its end (the kill, the
restart, the SIGCONT) to the recoveries docs/operations.md lists."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from schemas.status import TERMINAL_RUN_STATUSES
from tests.chaos.load import PROBE_FLOW, Load
from tests.chaos.stack import ChaosStack

TERMINAL = [s.value for s in TERMINAL_RUN_STATUSES]
FINAL_COUNT = "SELECT count(*) FROM runs WHERE id = ANY($1::text[]) AND status = ANY($2::text[])"
SERVICES = ("executor", "projector", "ingest", "api")


@dataclass(frozen=True)
class Plan:
    """How many of each fault, and their lengths."""

    kills: dict[str, int]  # service → kill -9 count, spread over its processes
    broker_kills: int
    broker_down_s: float
    postgres_restarts: int
    postgres_down_s: float
    pauses: int
    pause_s: float

    def faults(self, rng: random.Random) -> list[tuple[str, str]]:
        """(kind, target) in a random order."""
        out = [("kill -9", s) for s, n in self.kills.items() for _ in range(n)]
        out += [("broker kill", "broker")] * self.broker_kills
        out += [("PostgreSQL restart", "postgres")] * self.postgres_restarts
        out += [("SIGSTOP", rng.choice(SERVICES)) for _ in range(self.pauses)]
        rng.shuffle(out)
        return out


@dataclass
class Figures:
    """Recovery samples in seconds, by what was measured; the faults landed, by kind and target."""

    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    landed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    log: list[str] = field(default_factory=list)
    last_fault_end: float = 0.0

    timeouts: list[str] = field(default_factory=list)  # recoveries not seen within the limit

    def add(self, what: str, seconds: float | None) -> None:
        """A sample; None: not recovered within the limit (counted, and the run goes on to its checks)."""
        if seconds is None:
            self.timeouts.append(f"{what}: not within the limit (after {self.log[-1].strip() if self.log else '?'})")
        else:
            self.samples[what].append(seconds)


class Faults:
    """Lands the plan's faults on the stack while `load` runs, then times each recovery."""

    def __init__(self, stack: ChaosStack, load: Load, plan: Plan, seed: int, recovery_within: float = 180) -> None:
        self.stack = stack
        self.load = load
        self.plan = plan
        self.rng = random.Random(seed)
        self.within = recovery_within
        self.figures = Figures()
        self.pool: asyncpg.Pool | None = None
        self.started = time.monotonic()

    async def run(self, duration: float) -> Figures:
        """Land every fault, spread over about `duration` seconds of load."""
        faults = self.plan.faults(self.rng)
        schema = {"search_path": self.stack.sandbox.schema}
        self.pool = await asyncpg.create_pool(self.stack.postgres.dsn, min_size=1, max_size=2, server_settings=schema)
        try:
            for i, (kind, target) in enumerate(faults):
                remaining = duration - (time.monotonic() - self.started)
                gap = max(1.0, remaining / (len(faults) - i) - 8)
                await asyncio.sleep(self.rng.uniform(0.5 * gap, 1.5 * gap) if i else min(gap, 5))
                await self._land(kind, target)
        finally:
            await self.pool.close()
        return self.figures

    async def _land(self, kind: str, target: str) -> None:
        f = self.figures
        at = time.monotonic() - self.started
        if kind == "kill -9":
            name = self.rng.choice(self.stack.named(target))
            end = await self._kill(name)
            f.log.append(f"{at:7.1f} s  kill -9 {name}")
            f.landed[f"kill -9 {target}"] += 1
            await self._after_kill(target, name, end)
        elif kind == "broker kill":
            node = self.rng.choice(self.stack.brokers.nodes())
            await asyncio.to_thread(self.stack.brokers.kill, node)
            await asyncio.sleep(self.plan.broker_down_s)
            await asyncio.to_thread(self.stack.brokers.start_node, node)
            end = time.monotonic()
            f.log.append(f"{at:7.1f} s  broker {node} killed, started again after {self.plan.broker_down_s:.0f} s")
            f.landed["broker kill"] += 1
            f.add("broker back → trigger intake", await self._intake_after(end))
            f.add("broker back → every service ready", await self._ready(self.all(), end, self.within))
            f.add("broker kill: back → next run final", await self._next_final(end))
        elif kind == "PostgreSQL restart":
            await asyncio.to_thread(self.stack.postgres.stop_immediate)
            await asyncio.sleep(self.plan.postgres_down_s)
            await asyncio.to_thread(self.stack.postgres.start)
            end = time.monotonic()
            f.log.append(f"{at:7.1f} s  PostgreSQL stopped -m immediate, started after {self.plan.postgres_down_s} s")
            f.landed["PostgreSQL restart"] += 1
            names = self.stack.named("projector") + self.stack.named("api")
            f.add("PostgreSQL back → projector and API ready", await self._ready(names, end, self.within))
            f.add("PostgreSQL restart: back → next run final", await self._next_final(end))
        else:
            name = self.rng.choice(self.stack.named(target))
            pid = self.stack.supervisor.pid(name)
            assert pid is not None
            os.killpg(pid, signal.SIGSTOP)
            await asyncio.sleep(self.plan.pause_s)
            os.killpg(pid, signal.SIGCONT)
            end = time.monotonic()
            f.log.append(f"{at:7.1f} s  SIGSTOP {name} for {self.plan.pause_s:.0f} s")
            f.landed[f"SIGSTOP {target}"] += 1
            f.add(f"SIGSTOP {target}: SIGCONT → next run final", await self._next_final(end))
        f.last_fault_end = end
        print(f.log[-1], flush=True)

    async def _ready(self, names: list[str], since: float, within: float) -> float | None:
        """Seconds from `since` until every named process answered ready; None when not within `within`."""
        try:
            return await self.stack.until_ready(names, since, within)
        except AssertionError as exc:
            print(f"  {exc}", flush=True)
            return None

    def all(self) -> list[str]:
        return list(self.stack.processes)

    async def _kill(self, name: str) -> float:
        pid = self.stack.supervisor.pid(name)
        deadline = time.monotonic() + self.within
        while pid is None:  # still being restarted after the last fault
            assert time.monotonic() < deadline, f"{name} not running within {self.within} s"
            await asyncio.sleep(0.1)
            pid = self.stack.supervisor.pid(name)
        os.kill(pid, 9)
        return time.monotonic()

    async def _after_kill(self, service: str, name: str, killed: float) -> None:
        f = self.figures
        f.add(f"{service} kill → its /readyz", await self._ready([name], killed, self.within))
        for _ in range(40):  # the supervisor's probe sees the same answer within its 0.25 s period
            restarted = self.stack.supervisor.status()[name]["ready_after"]
            if restarted is not None:
                f.add(f"{service} restart → its /readyz", float(restarted))
                break
            await asyncio.sleep(0.1)
        if service == "ingest":
            f.add("ingest kill → trigger intake", await self._intake_after(killed))
        f.add(f"{service} kill → next run final", await self._next_final(killed))

    async def _intake_after(self, at: float) -> float | None:
        """Seconds from `at` until ingest accepted a trigger again."""

        def accepted() -> float | None:
            times = [r.accepted_at for r in self.load.requests if r.accepted_at is not None and r.accepted_at > at]
            return min(times) - at if times else None

        return await self._poll(accepted, "a trigger accepted")

    async def _next_final(self, at: float) -> float | None:
        """Seconds from `at` until the first probe-shape run triggered after it was final in the read model."""
        assert self.pool is not None
        pool = self.pool

        async def final() -> float | None:
            request = self.load.first_accepted_after(at, PROBE_FLOW)
            if request is None:
                return None
            try:
                done = await pool.fetchval(FINAL_COUNT, request.run_ids, TERMINAL, timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return None  # PostgreSQL restarting: asked again
            return time.monotonic() - at if done == len(request.run_ids) else None

        return await self._poll(final, "a run triggered after the fault final")

    async def _poll(self, check: Callable[[], Any], what: str) -> float | None:
        """Seconds `check` gave once it gave any; None when it gave nothing within the limit."""
        deadline = time.monotonic() + self.within
        while True:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result is not None:
                return float(result)
            if time.monotonic() > deadline:
                print(f"  {what}: not within {self.within:.0f} s", flush=True)
                return None
            await asyncio.sleep(0.1)
