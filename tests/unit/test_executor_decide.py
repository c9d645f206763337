"""The executor's decisions: a flow driven through decide/fold with a fake clock, as a user would see its events."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import TERMINAL_EVENTS
from schemas.status import RunStatus, StepStatus
from services.executor.decide import Clock, InternalFailure, StartRun, StepCompleted, TimerFired, decide
from services.executor.fold import fold, fold_all
from tests.unit.drive import T0, Run, error, make_flow, make_stored_flow, make_trigger

THREE = ({"name": "fetch"}, {"name": "shape"}, {"name": "push"})


def run_three_ok() -> Run:
    run = Run(make_flow(*THREE), make_trigger(payload={"order": 7}))
    run.start()
    for i in range(3):
        run.complete(output={"i": i})
    return run


# ---------------------------------------------------------------- the happy path


def test_three_step_flow_succeeds_with_the_expected_events() -> None:
    run = run_three_ok()
    assert run.types == [
        "RunRequested", "RunQueued", "RunStarted",
        "StepStarted", "StepSucceeded", "StepStarted", "StepSucceeded", "StepStarted", "StepSucceeded",
        "RunSucceeded",
    ]  # fmt: skip
    assert run.state is not None and run.state.status == RunStatus.SUCCEEDED
    assert [e.seq for e in run.events] == list(range(len(run.events)))
    assert {s.status for s in run.state.steps.values()} == {StepStatus.SUCCEEDED}


def test_envelope_names_the_run_flow_and_causing_input() -> None:
    run = run_three_ok()
    for e in run.events:
        assert (e.tenant_id, e.run_id, e.flow_id, e.flow_version, e.correlation_id) == ("t1", "run-1", "orders", 3,
                                                                                         "run-1")  # fmt: skip
    # The trigger caused the run's opening events; each step result caused what followed it.
    assert {e.causation_id for e in run.events[:4]} == {"trg-run-1"}
    assert run.events[4].causation_id == "run-1:fetch:1:result"
    requested = run.events[0].payload
    assert requested.flow_name == "Orders" and requested.tags == ("sales",)
    assert requested.trigger.payload == {"order": 7} and requested.received_at == T0


def test_step_started_carries_position_action_attempt_and_rendered_input() -> None:
    run = run_three_ok()
    started = run.of_type("StepStarted")
    assert [(e.payload.step, e.payload.position, e.payload.attempt, e.payload.action) for e in started] == [
        ("fetch", 0, 1, "transform"), ("shape", 1, 1, "transform"), ("push", 2, 1, "transform"),
    ]  # fmt: skip


def test_same_inputs_give_the_same_events_ids_included() -> None:
    a, b = run_three_ok(), run_three_ok()
    assert [e.model_dump() for e in a.events] == [e.model_dump() for e in b.events]
    assert len({e.event_id for e in a.events}) == len(a.events)


def test_run_succeeded_records_duration_from_run_start() -> None:
    run = run_three_ok()  # each step takes 1 s of fake time
    final = run.events[-1]
    assert final.payload.duration_ms == pytest.approx(3000)
    assert final.occurred_at == T0 + timedelta(seconds=3)
    assert run.of_type("StepSucceeded")[1].payload.output == {"i": 1}


# ---------------------------------------------------------------- conditions, assertions, extractions


def test_false_run_condition_skips_the_step_and_the_run_still_succeeds() -> None:
    run = Run(make_flow({"name": "a"}, {"name": "b", "run_condition": "trigger.send"}, {"name": "c"}),
              make_trigger(payload={"send": False}))  # fmt: skip
    run.start()
    run.complete()
    run.complete()
    assert run.types[3:] == ["StepStarted", "StepSucceeded", "StepSkipped", "StepStarted", "StepSucceeded",
                             "RunSucceeded"]  # fmt: skip
    skipped = run.of_type("StepSkipped")[0].payload
    assert (skipped.step, skipped.position) == ("b", 1)
    assert "trigger.send" in skipped.reason
    assert run.state is not None and run.state.status == RunStatus.SUCCEEDED
    assert run.state.steps["b"].status == StepStatus.SKIPPED


def test_a_skipped_step_records_its_action_masked_input_condition_and_value() -> None:
    step = {"name": "notify", "action": "http_request", "run_condition": "trigger.total > `100`",
            "input": {"url": "https://hooks.example/{{ trigger.id }}", "token": "{{ trigger.token }}",
                      "auth": "{{ secrets.HOOK_KEY }}"}}  # fmt: skip
    run = Run(make_flow(step), make_trigger(payload={"total": 40, "id": "o-1", "token": "tok-1"}))
    run.start()
    skipped = run.of_type("StepSkipped")[0].payload
    assert (skipped.step, skipped.position, skipped.action) == ("notify", 0, "http_request")
    # Rendered from the run's context and masked as a started step's input: a secret is never read to skip.
    assert skipped.input == {"url": "https://hooks.example/o-1", "token": "***", "auth": "***"}
    assert (skipped.run_condition, skipped.condition_value) == ("trigger.total > `100`", False)
    assert skipped.reason == 'run_condition "trigger.total > `100`" was false'
    assert run.types[-1] == "RunSucceeded"


@pytest.mark.parametrize(
    ("payload", "was"),
    [
        ({}, "was null"),
        ({"go": ""}, 'evaluated to "", which is false'),
        ({"go": []}, "evaluated to [], which is false"),
    ],
)
def test_a_skip_reason_says_what_a_falsy_condition_evaluated_to(payload: dict[str, object], was: str) -> None:
    run = Run(make_flow({"name": "a", "run_condition": "trigger.go"}), make_trigger(payload=payload))
    run.start()
    skipped = run.of_type("StepSkipped")[0].payload
    assert skipped.reason == f'run_condition "trigger.go" {was}'
    assert skipped.condition_value == payload.get("go")


def test_a_skipped_step_whose_input_cannot_render_is_skipped_with_no_input() -> None:
    # `b` counts the items `a` returned, but `a` was skipped too: nothing to render, and `b` does not run anyway.
    run = Run(make_flow({"name": "a", "run_condition": "`false`"},
                        {"name": "b", "run_condition": "steps.a.output",
                         "input": {"n": "{{ length(steps.a.output.items) }}"}}))  # fmt: skip
    run.start()
    a, b = (e.payload for e in run.of_type("StepSkipped"))
    assert a.input == {} and (b.action, b.input) == ("transform", None)
    assert b.reason == 'run_condition "steps.a.output" was null'
    assert run.types[-1] == "RunSucceeded"


def test_true_run_condition_runs_the_step() -> None:
    run = Run(make_flow({"name": "a", "run_condition": "trigger.send"}), make_trigger(payload={"send": True}))
    run.start()
    assert run.types[-1] == "StepStarted"


def test_run_condition_that_evaluates_to_zero_runs_the_step_like_jmespath_says() -> None:
    run = Run(make_flow({"name": "a", "run_condition": "trigger.n"}), make_trigger(payload={"n": 0}))
    run.start()
    assert run.types[-1] == "StepStarted"


def test_a_skipped_last_step_still_ends_the_run() -> None:
    run = Run(make_flow({"name": "a"}, {"name": "b", "run_condition": "`false`"}))
    run.start()
    run.complete()
    assert run.types[-2:] == ["StepSkipped", "RunSucceeded"]


def test_run_condition_that_cannot_be_evaluated_fails_the_run_as_validation() -> None:
    run = Run(make_stored_flow({"name": "a", "run_condition": "trigger.[["}))  # refused at publish today
    run.start()
    assert run.types[-3:] == ["StepStarted", "StepFailed", "RunFailed"]
    err = run.events[-1].payload.error
    assert err.category == "VALIDATION" and err.code == "template_error" and "trigger.[[" in err.message
    assert run.events[-1].payload.failed_step == "a"


def test_failed_assertion_fails_the_step_without_retry_and_records_actual() -> None:
    step = {"name": "check", "assertions": [{"expression": "status", "expected": 200}]}
    run = Run(make_flow(step, {"name": "after"}))
    run.start()
    run.complete(output={"status": 503})
    assert run.types[-2:] == ["StepFailed", "RunFailed"]
    failed = run.of_type("StepFailed")[0].payload
    assert failed.error.category == "VALIDATION" and failed.error.code == "assertion_failed"
    assert "503" in failed.error.message and "status" in failed.error.message
    assert [(a.expression, a.expected, a.actual, a.passed) for a in failed.assertions] == [("status", 200, 503, False)]
    assert failed.output == {"status": 503}
    assert "after" not in run.state.steps  # type: ignore[union-attr]
    assert run.state.status == RunStatus.FAILED  # type: ignore[union-attr]


def test_passing_assertions_are_recorded_on_success() -> None:
    assertions = [{"expression": "status", "expected": 200},
                  {"expression": "items", "operator": "contains", "expected": "x"}]  # fmt: skip
    step = {"name": "check", "assertions": assertions}
    run = Run(make_flow(step))
    run.start()
    run.complete(output={"status": 200, "items": ["x", "y"]})
    ok = run.of_type("StepSucceeded")[0].payload
    assert [a.passed for a in ok.assertions] == [True, True]
    assert run.types[-1] == "RunSucceeded"


def test_extractions_become_vars_that_later_steps_render() -> None:
    flow = make_flow(
        {"name": "login", "extract": {"token": "body.token", "ids": "body.items[].id"}},
        {"name": "call", "input": {"auth": "Bearer {{ vars.token }}", "ids": "{{ vars.ids }}",
                                   "prev": "{{ steps.login.output.body.items[0] }}"}},
    )  # fmt: skip
    run = Run(flow)
    run.start()
    run.complete(output={"body": {"token": "abc", "items": [{"id": 1}, {"id": 2}]}})
    assert run.of_type("StepSucceeded")[0].payload.extractions == {"token": "abc", "ids": [1, 2]}
    assert run.of_type("StepStarted")[1].payload.input == {"auth": "Bearer abc", "ids": [1, 2], "prev": {"id": 1}}


def test_step_input_renders_the_trigger_payload_keeping_types() -> None:
    run = Run(make_flow({"name": "a", "input": {"n": "{{ trigger.n }}", "txt": "n={{ trigger.n }}"}}),
              make_trigger(payload={"n": 5}))  # fmt: skip
    run.start()
    assert run.of_type("StepStarted")[0].payload.input == {"n": 5, "txt": "n=5"}


def test_bad_input_template_fails_the_run_before_the_step_runs() -> None:
    run = Run(make_stored_flow({"name": "a", "input": {"x": "{{ trigger.[ }}"}}))  # refused at publish today
    run.start()
    assert run.types[-3:] == ["StepStarted", "StepFailed", "RunFailed"]
    assert run.of_type("StepFailed")[0].payload.error.code == "template_error"


def test_bad_extraction_fails_the_step() -> None:
    run = Run(make_flow({"name": "a", "extract": {"n": "length(@)"}}))
    run.start()
    run.complete(output=5)  # length() of a number is a JMESPath type error
    assert run.types[-2:] == ["StepFailed", "RunFailed"]
    assert run.of_type("StepFailed")[0].payload.error.code == "extraction_failed"


# ---------------------------------------------------------------- other endings


def test_unknown_flow_makes_the_run_invalid() -> None:
    run = Run(None, make_trigger(flow_version=4))
    run.start()
    assert run.types == ["RunRequested", "RunInvalid"]
    assert run.state is not None and run.state.status == RunStatus.INVALID
    assert run.events[-1].payload.reason == "flow 'orders' version 4 does not exist"
    assert [e.seq for e in run.events] == [0, 1]
    assert run.events[0].flow_version == 4


def test_unknown_flow_without_version_names_the_flow() -> None:
    run = Run(None)
    run.start()
    assert run.events[-1].payload.reason == "flow 'orders' does not exist"


def test_internal_failure_cancels_the_running_step_and_ends_the_run() -> None:
    run = Run(make_flow(*THREE))
    run.start()
    run.complete()
    run.feed(InternalFailure("run-1", "KeyError: 'x'", "Traceback ...", at_seq=run.state.next_seq))  # type: ignore[union-attr]
    assert run.types[-2:] == ["StepCanceled", "RunInternalError"]
    assert run.events[-2].payload.step == "shape"
    err = run.events[-1].payload.error
    assert err.category == "INTERNAL" and err.message == "KeyError: 'x'" and err.details == {"trace": "Traceback ..."}
    assert run.state.status == RunStatus.INTERNAL_ERROR  # type: ignore[union-attr]
    assert run.state.steps["shape"].status == StepStatus.CANCELED  # type: ignore[union-attr]


def test_internal_failure_while_retrying_cancels_the_retry() -> None:
    run = Run(make_flow({"name": "a"}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"))
    run.feed(InternalFailure("run-1", "boom", at_seq=run.state.next_seq))  # type: ignore[union-attr]
    assert run.types[-2:] == ["StepCanceled", "RunInternalError"]
    # The retry's timer, still due, decides nothing for a finished run.
    assert run.feed(TimerFired("run-1", "a", 1)) == []


def test_internal_failure_for_an_unknown_run_decides_nothing() -> None:
    assert decide(None, make_flow(*THREE), InternalFailure("nope", "x"), Clock(T0)) == []


def test_a_finished_run_ignores_every_further_input() -> None:
    run = run_three_ok()
    assert run.state is not None
    clock = Clock(T0 + timedelta(hours=1))
    for inp in (
        StartRun(make_trigger(), 3),
        StepCompleted("run-1", "push", 1, True),
        TimerFired("run-1", "push", 1),
        InternalFailure("run-1", "late", at_seq=99),
    ):
        assert decide(run.state, run.flow, inp, clock) == []


def test_result_for_a_step_that_is_not_running_is_ignored() -> None:
    run = Run(make_flow(*THREE))
    run.start()
    assert run.state is not None
    clock = Clock(T0)
    assert decide(run.state, run.flow, StepCompleted("run-1", "shape", 1, True), clock) == []  # not started
    assert decide(run.state, run.flow, StepCompleted("run-1", "fetch", 2, True), clock) == []  # wrong attempt
    assert decide(run.state, run.flow, TimerFired("run-1", "fetch", 1), clock) == []  # not retrying


# ---------------------------------------------------------------- redelivery (invariant 3)


def test_redelivered_trigger_decides_nothing() -> None:
    run = Run(make_flow(*THREE))
    run.start()
    assert run.start() == []


def test_redelivered_step_result_decides_nothing() -> None:
    run = Run(make_flow(*THREE))
    run.start()
    run.complete()
    again = run.inputs[-1]
    assert run.feed(again) == []
    # Also after a crash: state rebuilt from the ledger alone recognises the input.
    rebuilt = fold_all(run.events)
    assert decide(rebuilt, run.flow, again, Clock(T0 + timedelta(minutes=5))) == []


def test_redelivered_timer_decides_nothing() -> None:
    run = Run(make_flow({"name": "a"}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"))
    run.fire_timer()
    assert run.feed(run.inputs[-1]) == []


def test_decide_on_rebuilt_state_equals_decide_on_live_state() -> None:
    run = Run(make_flow(*THREE))
    run.start()
    inp = StepCompleted("run-1", "fetch", 1, True, {"a": 1})
    clock = Clock(T0 + timedelta(seconds=3))
    assert decide(run.state, run.flow, inp, clock) == decide(fold_all(run.events), run.flow, inp, clock)


def test_existing_run_whose_flow_version_is_missing_is_an_error_not_a_decision() -> None:
    run = Run(make_flow(*THREE))
    run.start()
    with pytest.raises(LookupError, match="flow version of run run-1 is unknown"):
        decide(run.state, None, StepCompleted("run-1", "fetch", 1, True), Clock(T0))


def test_fold_refuses_a_run_that_does_not_start_with_run_requested() -> None:
    run = run_three_ok()
    with pytest.raises(ValueError, match="starts with RunQueued"):
        fold(None, run.events[1])


# ---------------------------------------------------------------- properties over random outcomes

_OUTCOMES = st.sampled_from(["ok", "TRANSIENT", "AUTH", "VALIDATION", "CONFLICT", "INTERNAL", "assert_fail"])


@st.composite
def _flows(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    n = draw(st.integers(1, 5))
    steps = []
    for i in range(n):
        step: dict[str, object] = {"name": f"s{i}", "assertions": [{"expression": "ok", "expected": True}]}
        if draw(st.booleans()):
            step["run_condition"] = draw(st.sampled_from(["`true`", "`false`", "trigger.go"]))
        if draw(st.booleans()):
            step["retry"] = {"delays_s": draw(st.lists(st.sampled_from([0.5, 1, 60]), max_size=3))}
        steps.append(step)
    return make_flow(*steps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flow=_flows(), outcomes=st.lists(_OUTCOMES, min_size=30, max_size=30), go=st.booleans(),
       crash_at=st.integers(0, 40))  # fmt: skip
def test_any_run_ends_exactly_once_with_gap_free_seq(flow, outcomes, go, crash_at) -> None:  # type: ignore[no-untyped-def]
    run = Run(flow, make_trigger(payload={"go": go}))
    run.start()
    steps_taken = 0
    while not run.state.terminal:  # type: ignore[union-attr]
        assert steps_taken < len(outcomes), "the run did not end within 30 step results"
        _, step = run.active()  # type: ignore[misc]
        if steps_taken == crash_at:
            # A crash before the state was saved: rebuilt from the ledger, a redelivered input decides nothing.
            assert fold_all(run.ledger) == run.state
            if run.inputs:
                assert decide(fold_all(run.ledger), flow, run.inputs[-1], Clock(run.now)) == []
        if step.status == StepStatus.RETRYING:
            run.fire_timer()
            continue
        outcome = outcomes[steps_taken]
        steps_taken += 1
        if outcome == "ok":
            run.complete(output={"ok": True})
        elif outcome == "assert_fail":
            run.complete(output={"ok": False})
        else:
            run.complete(ok=False, err=error(outcome))

    assert [e.seq for e in run.ledger] == list(range(len(run.ledger)))
    assert len({e.event_id for e in run.ledger}) == len(run.ledger)
    terminal = [e for e in run.ledger if type(e) in TERMINAL_EVENTS]
    assert len(terminal) == 1 and terminal[0] is run.ledger[-1]
    final = fold_all(run.ledger)
    assert final == run.state and final is not None and final.terminal
    # Success exactly when every step succeeded or was skipped; otherwise the failed step is named.
    done = {s.status for s in final.steps.values()}
    if final.status == RunStatus.SUCCEEDED:
        assert done <= {StepStatus.SUCCEEDED, StepStatus.SKIPPED} and len(final.steps) == len(flow.steps)
    else:
        assert final.status == RunStatus.FAILED
        failed = run.events[-1].payload.failed_step
        assert final.steps[failed].status == StepStatus.FAILED
    # Every StepStarted names the step's index in the flow; attempts count up from 1 without gaps.
    for e in run.of_type("StepStarted"):
        assert e.payload.position == flow.position(e.payload.step)
    for s in flow.steps:
        attempts = [e.payload.attempt for e in run.of_type("StepStarted") if e.payload.step == s.name]
        assert attempts == list(range(1, len(attempts) + 1))
    # Nothing more happens to a finished run.
    assert run.feed(run.inputs[-1]) == []
