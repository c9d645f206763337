"""What a live run waits for next (services/executor/next.py), from states the real `decide` produced."""

from __future__ import annotations

from datetime import timedelta

from schemas.events import ResumeRun
from schemas.status import RunStatus
from services.executor import next as nxt
from services.executor.decide import Admission, CommandInput, StartRun
from services.executor.fold import fold_all
from tests.unit.drive import T0, Run, error, make_flow, make_trigger

TWO = ({"name": "fetch"}, {"name": "push"})


def started(run: Run, admission: Admission | None = None) -> Run:
    run.feed(StartRun(run.trigger, run.flow.version if run.flow else 0, admission or Admission()))
    return run


def choose(run: Run, *, after_s: float = 0.0) -> nxt.Action:
    assert run.state is not None and run.flow is not None
    return nxt.choose(run.state, run.flow, run.now + timedelta(seconds=after_s), time_scale=1.0)


def test_a_running_step_is_run_and_a_finished_run_waits_for_nothing() -> None:
    run = started(Run(make_flow(*TWO)))
    assert choose(run) == nxt.RunStep("fetch")
    run.complete(output={})
    assert choose(run) == nxt.RunStep("push")
    run.complete(output={})
    assert choose(run) == nxt.Idle()


def test_a_retrying_step_waits_for_its_timer_then_fires_it_and_the_deadline_comes_first() -> None:
    run = started(Run(make_flow({"name": "call", "retry": {"delays_s": [30]}})))
    run.complete(ok=False, err=error("TRANSIENT"))
    assert run.state is not None
    retry_at = run.state.steps["call"].retry_at
    assert retry_at is not None
    assert choose(run) == nxt.Wait(retry_at)
    assert choose(run, after_s=31) == nxt.FireTimer("call", 1)
    limited = started(Run(make_flow({"name": "call", "retry": {"delays_s": [300]}}, timeout_s=10)))
    limited.complete(ok=False, err=error("TRANSIENT"), took_s=1)
    assert limited.state is not None and limited.state.started_at is not None
    assert choose(limited) == nxt.Wait(limited.state.started_at + timedelta(seconds=10))  # the deadline, not 300 s
    assert choose(limited, after_s=10) == nxt.Deadline()


def test_a_step_of_a_flow_with_a_timeout_runs_until_the_flow_deadline_at_most() -> None:
    run = started(Run(make_flow(*TWO, timeout_s=20)))
    assert run.state is not None and run.state.started_at is not None
    assert choose(run) == nxt.RunStep("fetch", run.state.started_at + timedelta(seconds=20))
    assert choose(started(Run(make_flow(*TWO)))) == nxt.RunStep("fetch", None)  # no timeout: no deadline


def test_a_scheduled_run_waits_for_its_time_then_is_due() -> None:
    run = started(Run(make_flow(*TWO), make_trigger(run_at=T0 + timedelta(minutes=5))))
    assert choose(run) == nxt.Wait(T0 + timedelta(minutes=5))
    assert choose(run, after_s=300) == nxt.ScheduledDue()


def test_a_blocked_run_asks_the_shared_admission_which_keeps_the_arrival_order() -> None:
    run = started(Run(make_flow(*TWO, concurrency_limit=1)), Admission(flow_active=1))
    assert run.state is not None and run.state.status == RunStatus.BLOCKED
    assert choose(run) == nxt.TryUnblock()


def test_a_queued_run_left_without_its_start_by_a_crash_asks_to_start() -> None:
    run = started(Run(make_flow(*TWO, concurrency_limit=1)))
    run.state = fold_all(run.ledger[:2])  # RunRequested, RunQueued recorded; RunStarted lost
    assert run.state is not None and run.state.status == RunStatus.QUEUED
    assert choose(run) == nxt.TryUnblock()


def test_a_pause_waits_for_its_expiry_or_a_resume() -> None:
    ask = {"name": "approve", "action": "human_input", "input": {"question": "ok?"}, "timeout_s": 60}
    run = started(Run(make_flow(ask)))
    assert run.state is not None and run.state.pause is not None
    pause = run.state.pause
    assert choose(run) == nxt.Wait(pause.expires_at)
    assert choose(run, after_s=61) == nxt.ExpirePause(pause.request_id)
    forever = started(Run(make_flow({**ask, "timeout_s": None})))
    assert choose(forever) == nxt.Idle()  # only a resume drives it on
    assert forever.state is not None and forever.state.pause is not None
    resume = ResumeRun(tenant_id="t1", run_id="run-1", request_id=forever.state.pause.request_id, payload={"ok": True})
    forever.feed(CommandInput(resume))
    assert choose(forever) == nxt.Idle()  # the run ended after its only step


def test_a_subflow_step_starts_its_child_and_waits_until_the_deadline() -> None:
    child = {"name": "child", "action": "subflow", "input": {"flow_id": "other"}}
    run = started(Run(make_flow(child)))
    assert choose(run) == nxt.StartChild("child", None)
    timed = started(Run(make_flow(child, timeout_s=20)))
    assert timed.state is not None and timed.state.started_at is not None
    assert choose(timed) == nxt.StartChild("child", timed.state.started_at + timedelta(seconds=20))
