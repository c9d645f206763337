"""Every status change `decide` emits is one the transition table allows (schemas/status.py), on any path a run can
take: random flows (conditions, retries, human input, subflows, limits, timeouts, scheduled starts) driven by random
inputs in random order — results, timers, cancels, resumes, expiries, deadlines, internal failures, redeliveries and
stale inputs. `tests/unit/drive.py` checks each event as it is folded; this test adds the paths."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    TERMINAL_EVENTS,
    CancelRun,
    ChildRunFinished,
    ErrorCategory,
    ErrorInfo,
    ResumeRun,
)
from schemas.status import TERMINAL_RUN_STATUSES, RunStatus, StepStatus, can_transition
from services.executor import decide
from tests.unit.drive import T0, Run, make_stored_flow, make_trigger

_steps = st.fixed_dictionaries(
    {"action": st.sampled_from(["transform", "transform", "http_request", "human_input", "subflow"])},
    optional={
        "run_condition": st.sampled_from(["`true`", "`false`", "trigger.go", "not_a_function(("]),
        "timeout_s": st.sampled_from([5.0, 60.0]),
        "retry": st.fixed_dictionaries({"delays_s": st.lists(st.sampled_from([0.0, 1.0, 10.0]), max_size=3)}),
        "assertions": st.just([{"expression": "ok", "expected": True}]),
    },
)
_flows = st.builds(
    lambda steps, limit, timeout: make_stored_flow(
        *[{**s, "name": f"s{i}", "input": {"flow_id": "child"} if s["action"] == "subflow" else {}}
          for i, s in enumerate(steps)],
        concurrency_limit=limit, timeout_s=timeout,
    ),
    st.lists(_steps, min_size=1, max_size=4),
    st.none() | st.integers(1, 2),
    st.none() | st.sampled_from([30.0, 600.0]),
)  # fmt: skip
# Mostly room to start; sometimes a full quota or a flow at its concurrency limit.
_admissions = st.sampled_from([decide.Admission()] * 4) | st.builds(
    decide.Admission, flow_active=st.integers(0, 2), tenant_active=st.integers(0, 2),
    tenant_limit=st.none() | st.integers(1, 3), queued_ahead=st.integers(0, 1),
)  # fmt: skip
_errors = st.builds(
    ErrorInfo, category=st.sampled_from(ErrorCategory), message=st.just("boom"),
    code=st.sampled_from([None, "timeout"]), status_code=st.sampled_from([None, 429, 502]),
)  # fmt: skip
_outputs = st.sampled_from([None, {"ok": True}, {"ok": False}])
_KINDS = ("result",) * 8 + ("timer",) * 3 + ("resume",) * 2 + (
    "stale", "redeliver", "cancel", "expire", "deadline", "due", "slot", "internal", "child",
)  # fmt: skip


def _next_input(run: Run, kind: str, data: st.DataObject) -> decide.Input:
    """An input of `kind` that fits the run as it stands where one can (a result for the running step, the answer
    to the open pause …), and otherwise one the run must ignore."""
    state = run.state
    assert state is not None
    active = run.active()
    name, step = active if active is not None else ("s0", None)
    attempt = step.attempt if step is not None else 1
    match kind:
        case "result":
            ok = data.draw(st.booleans())
            error = None if ok else data.draw(_errors)
            return decide.StepCompleted(state.run_id, name, attempt, ok, data.draw(_outputs), error, duration_ms=5.0)
        case "timer":
            return decide.TimerFired(state.run_id, name, attempt)
        case "stale":  # a result for an attempt that is not the current one
            return decide.StepCompleted(state.run_id, name, attempt + data.draw(st.sampled_from([-1, 1])), True)
        case "redeliver":
            return data.draw(st.sampled_from(run.inputs))
        case "cancel":
            return decide.CommandInput(CancelRun(tenant_id="t1", run_id=state.run_id, reason="stop"))
        case "resume":
            request = state.pause.request_id if state.pause is not None else "req_none"
            return decide.CommandInput(
                ResumeRun(tenant_id="t1", run_id=state.run_id, request_id=request, payload={"ok": 1})
            )
        case "expire":
            return decide.PauseExpired(state.run_id, state.pause.request_id if state.pause is not None else "req_none")
        case "deadline":
            return decide.DeadlinePassed(state.run_id)
        case "due":
            return decide.ScheduledDue(state.run_id, data.draw(_admissions))
        case "slot":
            return decide.SlotFreed(state.run_id, data.draw(_admissions))
        case "internal":
            return decide.InternalFailure(state.run_id, "the engine broke", at_seq=state.next_seq)
        case _:  # a subflow child's end, for whichever step waits (or none)
            status = data.draw(st.sampled_from(["SUCCEEDED", "FAILED", "PARTIAL", "TIMED_OUT"]))
            ended = ChildRunFinished(tenant_id="t1", run_id=state.run_id, child_run_id=f"child-{name}", step=name,
                                     attempt=attempt, status=status)  # fmt: skip
            return decide.CommandInput(ended)


@settings(max_examples=400, deadline=None)
@given(
    flow=_flows,
    admission=_admissions,
    scheduled=st.sampled_from([False] * 3 + [True]),
    go=st.booleans(),
    data=st.data(),
)
def test_every_transition_decide_emits_is_in_the_table(
    flow: Any, admission: decide.Admission, scheduled: bool, go: bool, data: st.DataObject
) -> None:
    run_at = T0 + timedelta(minutes=5) if scheduled else None
    run = Run(flow, make_trigger(payload={"go": go}, run_at=run_at))
    run.feed(decide.StartRun(run.trigger, flow.version, admission))  # Run.feed checks every event against the table
    for _ in range(data.draw(st.integers(1, 25))):
        assert run.state is not None
        before, seen = run.state, len(run.ledger)
        run.now += timedelta(seconds=data.draw(st.sampled_from([0, 1, 30, 900])))
        decided = run.feed(_next_input(run, data.draw(st.sampled_from(_KINDS)), data))
        new = run.ledger[seen:]
        # seq stays gap-free, and an ended run decides nothing more.
        assert [e.seq for e in new] == list(range(before.next_seq, before.next_seq + len(new)))
        if before.status in TERMINAL_RUN_STATUSES:
            assert decided == [] and new == []
        ends = [e for e in new if type(e) in TERMINAL_EVENTS]
        assert len(ends) <= 1 and (not ends or new[-1] is ends[0])
    final = run.state
    assert final is not None
    if final.status in TERMINAL_RUN_STATUSES:
        # An ended run leaves no step running or waiting to retry.
        assert all(s.status not in (StepStatus.RUNNING, StepStatus.RETRYING) for s in final.steps.values())


def test_the_table_refuses_what_decide_never_does() -> None:
    """The property above would pass vacuously if the table allowed everything: it does not."""
    assert not can_transition(RunStatus.SUCCEEDED, RunStatus.RUNNING)
    assert not can_transition(RunStatus.QUEUED, RunStatus.SUCCEEDED)
    assert not can_transition(RunStatus.CREATED, RunStatus.RUNNING)
