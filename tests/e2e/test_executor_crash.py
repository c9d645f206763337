"""A SIGKILLed executor with steps in flight and timers pending loses and repeats nothing (invariants 2 to 5).

At the moment of the kill there are http_request steps waiting on a slow upstream, steps in retry backoff, `delay`
steps, SCHEDULED runs, PAUSED human_input runs (one expiring), a run under a flow deadline and fresh triggers. The
restarted executor rebuilds all of it from the ledger; the test then reads the ledger topic itself from offset 0.

Time runs 100 times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01): 600 scaled seconds are 6 real ones.
The `soon` timers (6 s) fall due while no executor runs: the test restarts it only once they are overdue. The `late`
ones (20 s) fall due after the restarted executor owns its partitions again, so it must wait for them itself.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from schemas.events import TERMINAL_EVENT_STATUS, EventBase
from schemas.flows import FlowDefinition
from tests.conftest import Infra
from tests.harness import (
    TERMINAL,
    Call,
    Env,
    answer,
    delayed,
    first_calls,
    flow,
    ledger,
    running,
    step_status,
    stub_upstream,
    wait_until,
)

SCALE = 0.01
SOON_S = 600.0  # scaled: due while the executor is down (6 real seconds)
LATE_S = 2000.0  # scaled: due after the restarted executor owns its partitions again (20 real seconds)
FIRST_CALL_HOLD_S = 4.0  # the slow upstream holds a key's first request this long: it is in flight at the kill
REPEAT_CALL_HOLD_S = 0.5
RESULT_EVENTS = {"StepSucceeded", "StepFailed", "StepAttemptFailed"}


async def _accepted(request: web.Request) -> web.Response:
    return web.json_response({"accepted": (await request.json())["n"]})


async def _reserved(request: web.Request) -> web.Response:
    return web.json_response({"reserved": (await request.json())["n"]})


ROUTES = {
    # Slow to answer a key's first request (held across the kill), quick to answer a repeat of it.
    ("POST", "/slow"): first_calls(1, delayed(FIRST_CALL_HOLD_S, _accepted), delayed(REPEAT_CALL_HOLD_S, _accepted),
                                   per=lambda c: c.key),
    # 503 to the first request of each run's step, whatever its key; 200 from then on.
    ("POST", "/flaky"): first_calls(1, answer({"error": "warehouse offline"}, 503), _reserved,
                                    per=lambda c: c.json()["run"]),
}  # fmt: skip


def _flows(upstream: str) -> list[FlowDefinition]:
    def a(id: str, steps: list[dict[str, Any]], **extra: Any) -> FlowDefinition:
        return flow("tenant-a", id, steps, name=id, **extra)

    def call(path: str, **extra: Any) -> dict[str, Any]:
        body = {"run": "{{ run.id }}", "n": "{{ trigger.n }}"}
        return {"name": "call", "action": "http_request", "input": {"method": "POST", "url": upstream + path,
                                                                    "body": body}, **extra}  # fmt: skip

    def wait(seconds: float) -> dict[str, Any]:
        return {"name": "wait", "action": "delay", "input": {"seconds": seconds}}

    def shape(name: str) -> dict[str, Any]:
        return {"name": name, "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}

    return [
        a("quick", [shape("shape")]),
        a("slowcall", [call("/slow", retry={"delays_s": []}), shape("after")]),
        a("retry_soon", [call("/flaky", retry={"delays_s": [SOON_S]}), shape("after")]),
        a("retry_late", [call("/flaky", retry={"delays_s": [LATE_S]}), shape("after")]),
        a("delay_soon", [shape("before"), wait(SOON_S), shape("after")]),
        a("delay_late", [shape("before"), wait(LATE_S), shape("after")]),
        a("deadline", [shape("before"), wait(10 * LATE_S)], timeout_s=SOON_S),
        a("approval", [shape("before"), {"name": "approve", "action": "human_input", "input": {"q": "ship?"}},
                          {"name": "ship", "action": "transform",
                           "input": {"output": {"by": "{{ steps.approve.output.by }}"}}}]),
        a("expiring", [{"name": "approve", "action": "human_input", "input": {"q": "?"}, "timeout_s": SOON_S}]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    extra = {
        "FLOWTRAIL_EXECUTOR_SESSION_TIMEOUT_S": "6",  # the broker's minimum: the partitions move on sooner
        "FLOWTRAIL_EXECUTOR_TIME_SCALE": str(SCALE),
    }
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, flows=_flows(up.url), env=extra, upstream=up
    ) as env:  # fmt: skip
        yield env


async def statuses(env: Env) -> dict[str, str]:
    """Every run's status as the read model has it (the sandbox holds only this test's runs)."""
    page = await env.ok("GET", "/v1/runs", params={"limit": 100})
    assert page["next_cursor"] is None, "more runs than one page"
    return {run["id"]: run["status"] for run in page["data"]}


@dataclass
class Crash:
    """When the executor died and came back, and which upstream requests it left unanswered."""

    killed_at: datetime
    restarted_at: datetime  # the new process started
    back_at: datetime  # the new process owns every partition again
    in_flight: set[str]  # Idempotency-Keys of the slow calls cut off by the kill


# What each group of runs waits for before the kill, seen through the API.
WAITING: dict[str, Callable[[dict[str, Any] | None], bool]] = {
    "scheduled_soon": lambda r: r is not None and r["status"] == "SCHEDULED",
    "scheduled_late": lambda r: r is not None and r["status"] == "SCHEDULED",
    "retry_soon": lambda r: step_status(r, "call") == "RETRYING",
    "retry_late": lambda r: step_status(r, "call") == "RETRYING",
    "delay_soon": lambda r: step_status(r, "wait") == "RUNNING",
    "delay_late": lambda r: step_status(r, "wait") == "RUNNING",
    "deadline": lambda r: step_status(r, "wait") == "RUNNING",
    "approval": lambda r: r is not None and r["status"] == "PAUSED",
    "expiring": lambda r: r is not None and r["status"] == "PAUSED",
}
EXPECTED = {"deadline": "TIMED_OUT", "expiring": "TIMED_OUT"}  # every other group SUCCEEDED


async def arm_timers(env: Env) -> tuple[dict[str, list[str]], datetime]:
    """Runs whose timers are pending; returns them by group and when every timer was armed."""
    now = datetime.now(UTC)
    soon_at, late_at = now + timedelta(seconds=SOON_S * SCALE), now + timedelta(seconds=LATE_S * SCALE)
    runs = {
        "scheduled_soon": await env.trigger_many("quick", [{"n": 0}], run_at=soon_at.isoformat()),
        "scheduled_late": await env.trigger_many("quick", [{"n": 1}], run_at=late_at.isoformat()),
        "retry_soon": await env.trigger_many("retry_soon", [{"n": i} for i in range(6)]),
        "retry_late": await env.trigger_many("retry_late", [{"n": i} for i in range(6)]),
        "delay_soon": await env.trigger_many("delay_soon", [{"n": i} for i in range(5)]),
        "delay_late": await env.trigger_many("delay_late", [{"n": i} for i in range(5)]),
        "deadline": await env.trigger_many("deadline", [{"n": i} for i in range(2)]),
        "approval": await env.trigger_many("approval", [{"n": 0}]),
        "expiring": await env.trigger_many("expiring", [{"n": i} for i in range(2)]),
    }
    for group, check in WAITING.items():

        async def waiting(ids: list[str] = runs[group], check: Callable[..., bool] = check) -> bool:
            return all(check(run) for run in await asyncio.gather(*(env.run(r) for r in ids)))

        await wait_until(waiting, 20, f"{group} waiting", logs=env.log_tails)
    return runs, datetime.now(UTC)


async def crash(env: Env, runs: dict[str, list[str]], soon_due_by: datetime) -> Crash:
    """Slow calls in flight and fresh triggers, SIGKILL, and a restart once the `soon` timers are overdue."""
    runs["slowcall"] = await env.trigger_many("slowcall", [{"n": i} for i in range(12)])
    runs["quick"] = await env.trigger_many("quick", [{"n": i} for i in range(10)])
    slow = len(runs["slowcall"])

    async def all_slow_calls_in_flight() -> bool:
        return len(env.upstream.in_flight("/slow")) == slow

    await wait_until(all_slow_calls_in_flight, 10, "every slow call in flight", logs=env.log_tails)
    # Nothing awaits between that check and the kill: the upstream (this event loop) cannot answer meanwhile.
    in_flight = {c.key for c in env.upstream.in_flight("/slow")}
    executor = env.stack["executor"]
    executor.kill()
    killed_at = datetime.now(UTC)
    assert len(in_flight) == slow

    # The `soon` timers fall due while no executor runs (invariant 5: "a timer is due while nothing is running").
    async def overdue() -> bool:
        return datetime.now(UTC) > soon_due_by

    await wait_until(overdue, SOON_S * SCALE + 5, "the soon timers due", logs=env.log_tails)
    restarted_at = datetime.now(UTC)
    executor.start()
    await executor.wait_healthy()

    async def owns_partitions() -> bool:
        r = await env.http.get(f"{executor.url}/healthz", timeout=2)
        return r.status_code == 200 and len(r.json()["partitions"]) == env.sandbox.partitions

    await wait_until(owns_partitions, 30, "partitions reassigned", logs=env.log_tails)
    return Crash(killed_at, restarted_at, datetime.now(UTC), in_flight)


async def resume_approval(env: Env, run_id: str) -> None:
    """The human answers after the restart, to the request id the run detail shows."""
    run = await env.run(run_id)
    assert run is not None and run["status"] == "PAUSED"
    r = await env.api("POST", f"/v1/runs/{run_id}/resume/{run['waiting_for']['request_id']}", json={"by": "ops@acme"})
    assert r.status_code == 202, r.text


def ledger_by_run(ledger: list[EventBase], group_of: dict[str, str]) -> dict[str, list[EventBase]]:
    """Each run's events by seq, after checking that no seq carries two different events."""
    first: dict[tuple[str, int], EventBase] = {}
    conflicts: list[str] = []
    for event in ledger:
        seen = first.setdefault((event.run_id, event.seq), event)
        if seen is not event and (seen.event_id, seen.type, seen.causation_id, seen.payload) != (
            event.event_id, event.type, event.causation_id, event.payload
        ):  # fmt: skip
            conflicts.append(f"{event.run_id} seq {event.seq} ({group_of.get(event.run_id)}): {seen.type} caused by "
                             f"{seen.causation_id}, then {event.type} caused by {event.causation_id}")  # fmt: skip
        # A repeat of the same event is allowed: the idempotent producer can still write a record twice across a
        # crash (a batch retried by a producer session that died), and consumers keep the first in log order
        # (invariant 3). A *different* event at a used seq is a second decision from stale state: the trap 2.3 names.
    assert not conflicts, f"{len(conflicts)} seqs carry two different events:\n" + "\n".join(conflicts)
    by_run: dict[str, list[EventBase]] = defaultdict(list)
    for event in sorted(first.values(), key=lambda e: e.seq):
        by_run[event.run_id].append(event)
    return by_run


def one(events: list[EventBase], type_: str, step: str | None = None, attempt: int | None = None) -> EventBase:
    found = [e for e in events if e.type == type_ and (step is None or _p(e, "step") == step)
             and (attempt is None or _p(e, "attempt") == attempt)]  # fmt: skip
    assert len(found) == 1, f"{type_} {step or ''}: {[e.type for e in events]}"
    return found[0]


def _p(event: EventBase, name: str) -> Any:
    return getattr(event.payload, name, None)


def timer(group: str, events: list[EventBase]) -> tuple[EventBase, datetime, EventBase]:
    """The event that armed a run's timer, when it was due, and the event its firing caused."""
    if group.startswith("retry"):
        armed = one(events, "StepAttemptFailed", "call", 1)
        return armed, _p(armed, "retry_at"), one(events, "StepStarted", "call", 2)
    if group.startswith("delay"):
        armed = one(events, "StepStarted", "wait")
        due = armed.occurred_at + timedelta(seconds=(SOON_S if group == "delay_soon" else LATE_S) * SCALE)
        return armed, due, one(events, "StepSucceeded", "wait")
    if group.startswith("scheduled"):
        armed = one(events, "RunScheduled")
        return armed, _p(armed, "run_at"), one(events, "RunStarted")
    if group == "deadline":
        armed = one(events, "RunStarted")
        return armed, armed.occurred_at + timedelta(seconds=SOON_S * SCALE), one(events, "RunTimedOut")
    assert group == "expiring"
    armed = one(events, "RunPaused")
    return armed, _p(armed, "expires_at"), one(events, "RunTimedOut")


async def test_an_executor_killed_with_steps_in_flight_and_timers_pending_loses_and_repeats_nothing(
    env: Env,
) -> None:
    runs, armed_at = await arm_timers(env)
    down = await crash(env, runs, soon_due_by=armed_at + timedelta(seconds=SOON_S * SCALE))
    await resume_approval(env, runs["approval"][0])

    group_of = {run_id: group for group, ids in runs.items() for run_id in ids}
    final: dict[str, str] = {}

    async def all_final() -> bool:
        final.update(await statuses(env))
        return all(final.get(r) in TERMINAL for r in group_of)

    await wait_until(all_final, 60, "every run final", logs=env.log_tails)

    # ---------------------------------------------------------------- the ledger, read from offset 0
    by_run = ledger_by_run(await ledger(env.sandbox), group_of)
    assert set(by_run) == set(group_of), f"runs missing from the ledger: {set(group_of) - set(by_run)}"
    for run_id, events in by_run.items():
        types = [e.type for e in events]
        assert [e.seq for e in events] == list(range(len(events))), f"{run_id} has a gap: {types}"
        terminal = [t for t in types if t in TERMINAL_EVENT_STATUS]
        assert len(terminal) == 1 and types[-1] == terminal[0], f"{run_id} ends with {terminal}: {types}"
        status = TERMINAL_EVENT_STATUS[terminal[0]]
        assert final[run_id] == status, f"{run_id}: the API says {final[run_id]}, the ledger {types}"
        assert status == EXPECTED.get(group_of[run_id], "SUCCEEDED"), f"{group_of[run_id]} {run_id}: {types}"

    # ---------------------------------------------------------------- no lost result, the same key on a re-run
    calls_by_key: dict[str, list[Call]] = defaultdict(list)
    for call in env.upstream.requests:
        run_id = call.json()["run"]
        # The attempt a request belongs to, from the ledger alone: the last one started before the request.
        begun = [
            e
            for e in by_run[run_id]
            if e.type == "StepStarted" and _p(e, "step") == "call" and e.occurred_at <= call.at
        ]
        assert begun, f"{run_id}: the upstream saw a request before the step started"
        attempt = _p(begun[-1], "attempt")
        assert call.key == f"{run_id}:call:{attempt}", f"{call.path} for attempt {attempt} carried {call.key}"
        calls_by_key[call.key].append(call)
        results = [e for e in by_run[run_id] if e.type in RESULT_EVENTS and _p(e, "step") == "call"
                   and _p(e, "attempt") == attempt]  # fmt: skip
        assert len(results) == 1, f"{run_id} attempt {attempt} ran upstream; its results: {results}"
    repeated = {key for key, calls in calls_by_key.items() if len(calls) > 1}
    # Exactly the requests cut off by the kill ran again, once, after the restart, with the same key and body.
    assert repeated == down.in_flight
    for key in repeated:
        before, after = calls_by_key[key]
        assert before.at < down.killed_at < down.restarted_at < after.at and before.json() == after.json()
    for run_id in runs["slowcall"]:
        one(by_run[run_id], "StepStarted", "call", 1)  # re-executed as the same attempt, not a new one
        reply = _p(one(by_run[run_id], "StepSucceeded", "call"), "output")["body"]
        assert reply == {"accepted": _p(by_run[run_id][0], "trigger").payload["n"]}
    for run_id in runs["retry_soon"] + runs["retry_late"]:
        keys = sorted(c.key for c in env.upstream.seen("/flaky") if c.json()["run"] == run_id)
        assert keys == [f"{run_id}:call:1", f"{run_id}:call:2"]  # a new attempt, a new key

    # ---------------------------------------------------------------- timers kept across the crash
    for group in ("retry_soon", "retry_late", "delay_soon", "delay_late", "scheduled_soon", "scheduled_late",
                  "deadline", "expiring"):  # fmt: skip
        for run_id in runs[group]:
            armed, due, fired = timer(group, by_run[run_id])
            assert armed.occurred_at < down.killed_at < down.restarted_at < fired.occurred_at, f"{group} {run_id}"
            assert fired.occurred_at >= due, f"{group} {run_id} fired at {fired.occurred_at}, due {due}"
            if group.endswith("_late"):
                assert due > down.back_at, f"{group} {run_id} was due before the executor was back"
            else:
                assert due < down.restarted_at, f"{group} {run_id} was not due while the executor was down"
    for group, seconds in (("delay_soon", SOON_S), ("delay_late", LATE_S)):
        for run_id in runs[group]:
            assert _p(one(by_run[run_id], "StepSucceeded", "wait"), "duration_ms") >= seconds * SCALE * 1000
    for run_id in runs["deadline"]:
        one(by_run[run_id], "StepFailed", "wait")  # the delay in flight failed at the deadline, which names it
    (approved,) = runs["approval"]
    resumed = one(by_run[approved], "RunResumed")
    assert resumed.occurred_at > down.back_at
    assert _p(one(by_run[approved], "StepSucceeded", "ship"), "output") == {"by": "ops@acme"}
