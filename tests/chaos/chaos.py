"""`make chaos` / `make chaos-smoke`: the whole stack on a private PostgreSQL and broker, supervised as `flowtrail up`
runs it, under a load of four flow shapes (10 transform steps, a durable delay, an HTTP step that fails twice and
then succeeds under its retry policy, a concurrency-limited flow) while faults land in a seeded random order:
kill -9 of executors, projectors, ingest and the API, the broker killed and started again, PostgreSQL stopped
`-m immediate` and started again, a service SIGSTOPped. Then every accepted trigger is checked on the ledger topic
(tests/chaos/checks.py) and `verify` must be equal. Prints one table and writes .state/chaos/latest.json
(docs/operations.md#recovery-figures). Fails on any loss, duplicate, stuck run or verify difference.

Not collected by `make test` (the file name is not test_*). Settings (environment):
FLOWTRAIL_CHAOS_SCALE=small|default, and to override one of the scale's values FLOWTRAIL_CHAOS_RUNS, _RATE,
_SEED, _EXECUTORS, _PROJECTORS, _BROKERS, _PARTITIONS; FLOWTRAIL_CHAOS_DIR, the run's folder."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg

from services.projector import rebuild
from tests.chaos.checks import check
from tests.chaos.faults import FINAL_COUNT, TERMINAL, Faults, Plan
from tests.chaos.load import CountingUpstream, Load, flows, serve
from tests.chaos.report import as_json, table
from tests.chaos.stack import ChaosStack, Topology, chaos_stack
from tests.harness import projector_settings, publish_flows, topic_records, wait_flows_projected

# The run's folder (FLOWTRAIL_CHAOS_DIR, to run two at once): the report, the logs, the private data.
FOLDER = Path(os.environ.get("FLOWTRAIL_CHAOS_DIR", Path(os.environ.get("FLOWTRAIL_STATE_DIR", ".state")) / "chaos"))
REPORT = FOLDER / "latest.json"
LOGS = FOLDER / "logs"  # each process's log of the last run
# The private PostgreSQL's and broker's data of the last run. Not under pytest's temporary folder: another pytest
# session starting takes the other users' access to it away, and PostgreSQL runs as its own user.
STATE = FOLDER / "state"
# Every accepted run final within this many seconds of the last fault (issue 15), or of the last trigger when the
# load went on after it.
FINAL_WITHIN_S = 60


@dataclass(frozen=True)
class Scale:
    runs: int
    rate: float  # runs per second
    batch: int  # runs per trigger request
    plan: Plan
    topology: Topology
    seed: int


# The default runs on a three-broker cluster with two executors and two projectors (docs/cluster.md); the small
# size, run by CI, on one broker and one process of each service, which start faster on a two-core machine (the same
# small run on the cluster: FLOWTRAIL_CHAOS_BROKERS=3 FLOWTRAIL_CHAOS_EXECUTORS=2 FLOWTRAIL_CHAOS_PROJECTORS=2).
SCALES = {
    "small": Scale(runs=1500, rate=12, batch=3, seed=15,
                   plan=Plan(kills={"executor": 2, "projector": 1, "ingest": 1, "api": 1}, broker_kills=1,
                             broker_down_s=8, postgres_restarts=1, postgres_down_s=3, pauses=1, pause_s=10),
                   topology=Topology()),
    "default": Scale(runs=20_000, rate=15, batch=4, seed=20,
                     plan=Plan(kills={"executor": 6, "projector": 5, "ingest": 5, "api": 4}, broker_kills=2,
                               broker_down_s=20, postgres_restarts=2, postgres_down_s=5, pauses=2, pause_s=30),
                     topology=Topology(brokers=3, executors=2, projectors=2)),
}  # fmt: skip


def scale_from_env() -> Scale:
    scale = SCALES[os.environ.get("FLOWTRAIL_CHAOS_SCALE", "default")]

    def number(name: str, default: float) -> float:
        return float(os.environ.get(f"FLOWTRAIL_CHAOS_{name}", default))

    topology = Topology(brokers=int(number("BROKERS", scale.topology.brokers)),
                        executors=int(number("EXECUTORS", scale.topology.executors)),
                        projectors=int(number("PROJECTORS", scale.topology.projectors)),
                        partitions=int(number("PARTITIONS", scale.topology.partitions)))  # fmt: skip
    return replace(scale, runs=int(number("RUNS", scale.runs)), rate=number("RATE", scale.rate),
                   seed=int(number("SEED", scale.seed)), topology=topology)  # fmt: skip


def _stack(topology: Topology) -> Callable[..., AbstractAsyncContextManager[ChaosStack]]:
    """One broker: a private broker as the e2e fault tests start one; several: the launcher's local cluster."""
    if topology.brokers == 1:
        return chaos_stack
    from tests.chaos.cluster import cluster_stack

    return cluster_stack


def _fresh(folder: Path) -> Path:
    if folder.is_symlink():  # a cluster run's logs link
        folder.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


async def _all_final(stack: ChaosStack, run_ids: list[str], within: float) -> None:
    deadline = time.monotonic() + within
    conn = await asyncpg.connect(stack.postgres.dsn, server_settings={"search_path": stack.sandbox.schema})
    try:
        while True:
            done = await conn.fetchval(FINAL_COUNT, run_ids, TERMINAL)
            if done == len(run_ids) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def test_chaos() -> None:
    scale = scale_from_env()
    counting = CountingUpstream()
    settings = {"FLOWTRAIL_INGEST_SCHEDULER": "false", "FLOWTRAIL_KAFKA_APPEND_TIMEOUT_S": "3",
                "FLOWTRAIL_EXECUTOR_SESSION_TIMEOUT_S": "6"}  # fmt: skip
    print(f"\nchaos: {scale.runs} runs at {scale.rate}/s on {scale.topology.describe()}, seed {scale.seed}")
    async with (
        serve(counting) as upstream,
        _stack(scale.topology)(scale.topology, _fresh(STATE), _fresh(LOGS), **settings) as stack,
    ):
        sandbox = stack.sandbox
        await stack.until_ready(list(stack.processes), time.monotonic(), 180)
        await wait_flows_projected(sandbox, await publish_flows(sandbox, flows(upstream.url)), within=60)
        load = Load(stack.url("ingest"), stack.key, scale.rate, scale.batch, scale.seed)
        loader = asyncio.create_task(load.run())
        faults = Faults(stack, load, scale.plan, scale.seed)
        figures = await faults.run(duration=scale.runs / scale.rate)
        await load.until_accepted(scale.runs)
        await load.drain()
        await loader
        last = max(figures.last_fault_end, max(r.accepted_at or 0 for r in load.requests))
        accepted = load.accepted_runs()
        await _all_final(stack, list(accepted), within=600)
        final_after = time.monotonic() - last
        records = await topic_records(stack.brokers.bootstrap, [sandbox.topics.ledger], within=300)
        outcome = check(accepted, records, counting, scale.topology.executors)
        progress: list[str] = []
        try:
            compared = await rebuild.run(projector_settings(sandbox), swap=False, progress=progress.append)
            verify = "equal" if compared.comparison.equal else rebuild.describe(compared.comparison)
        except Exception as exc:  # the table is still printed, with why verify could not compare
            verify = f"could not run: {exc!r}"
        restarts = {name: info["restarts"] for name, info in stack.supervisor.status().items()}
    unanswered = sum(1 for r in load.requests if r.accepted_at is None)
    codes = Counter(status for r in load.requests for status in r.answers)
    extra = {
        "all final, s after the last fault or trigger": round(final_after, 1),
        "trigger requests / tries / never accepted": f"{len(load.requests)} / "
        f"{sum(r.tries for r in load.requests)} / {unanswered}",
        "trigger answers (0: none)": " ".join(f"{c} x{n}" for c, n in sorted(codes.items())),
        "recoveries not seen within 180 s": len(figures.timeouts),
        "restarts": " ".join(f"{n} {c}" for n, c in restarts.items()),
        "verify": verify if verify == "equal" else f"NOT EQUAL: {verify[:300]}",
    }
    print(table(figures, outcome, extra))
    print("faults:\n" + "\n".join(figures.log + [f"NOT RECOVERED {t}" for t in figures.timeouts]))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    settings_used = {"scale": os.environ.get("FLOWTRAIL_CHAOS_SCALE", "default"), "runs": scale.runs,
                     "rate": scale.rate, "seed": scale.seed, "topology": scale.topology.describe()}  # fmt: skip
    REPORT.write_text(json.dumps(as_json(figures, outcome, {**extra, "settings": settings_used}), indent=2) + "\n")
    print(f"written to {REPORT}; logs in {LOGS}")
    assert not outcome.problems, outcome.problems
    assert unanswered == 0, f"{unanswered} trigger requests never accepted"
    assert not figures.timeouts, figures.timeouts
    assert 500 not in codes, f"ingest answered 500 {codes[500]} times (a fault must be 503 + Retry-After)"
    assert outcome.final == outcome.accepted and outcome.missing == 0 and outcome.duplicated == 0
    assert verify == "equal", verify
    assert final_after <= FINAL_WITHIN_S, f"the last run final {final_after:.1f} s after the last fault"
