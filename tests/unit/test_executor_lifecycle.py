"""The run lifecycle beyond the happy path, decided by the pure decide/fold with a fake clock: scheduled,
blocked, quota, invalid input, human input, timeouts, cancel, subflow results, retries that reuse outputs and
records that fail a sync."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from schemas.events import CancelRun, ChildRunFinished, CursorWindow, ErrorCategory, ErrorInfo, ResumeRun, RetryStrategy
from schemas.status import RunStatus, StepStatus
from services.executor.decide import (
    Admission,
    CommandInput,
    DeadlinePassed,
    PauseExpired,
    ScheduledDue,
    SlotFreed,
    StartRun,
)
from tests.unit.drive import T0, Run, error, make_flow, make_trigger

TWO = ({"name": "fetch"}, {"name": "push"})


def started(run: Run, admission: Admission | None = None) -> Run:
    run.feed(StartRun(run.trigger, run.flow.version if run.flow else 0, admission or Admission()))
    return run


def status(run: Run) -> RunStatus:
    assert run.state is not None
    return run.state.status


# ---------------------------------------------------------------- admission


def test_a_run_at_a_future_time_is_scheduled_then_queued_when_due() -> None:
    run = started(Run(make_flow(*TWO), make_trigger(run_at=T0 + timedelta(minutes=5))))
    assert run.types == ["RunRequested", "RunScheduled"] and status(run) == RunStatus.SCHEDULED
    assert run.state is not None and run.state.run_at == T0 + timedelta(minutes=5)

    run.now = T0 + timedelta(minutes=5)
    run.feed(ScheduledDue("run-1"))
    assert run.types[2:] == ["RunQueued", "RunStarted", "StepStarted"]
    assert run.feed(ScheduledDue("run-1")) == []  # a repeated timer decides nothing


def test_a_run_at_in_the_past_starts_at_once() -> None:
    run = started(Run(make_flow(*TWO), make_trigger(run_at=T0 - timedelta(seconds=1))))
    assert run.types == ["RunRequested", "RunQueued", "RunStarted", "StepStarted"]


def test_a_flow_at_its_limit_blocks_and_a_freed_slot_starts_the_run() -> None:
    flow = make_flow(*TWO, concurrency_limit=2)
    run = started(Run(flow), Admission(flow_active=2))
    assert run.types == ["RunRequested", "RunQueued", "RunBlocked"] and status(run) == RunStatus.BLOCKED
    assert "concurrency limit is 2" in run.events[-1].payload.reason

    assert run.feed(SlotFreed("run-1", Admission(flow_active=2))) == []  # still full: nothing recorded
    run.feed(SlotFreed("run-1", Admission(flow_active=1)))
    assert run.types[3:] == ["RunQueued", "RunStarted", "StepStarted"]


def test_a_new_run_waits_behind_blocked_runs_even_when_a_slot_is_free() -> None:
    run = started(Run(make_flow(*TWO, concurrency_limit=2)), Admission(flow_active=1, queued_ahead=1))
    assert status(run) == RunStatus.BLOCKED


def test_a_tenant_over_its_quota_ends_quota_exceeded() -> None:
    run = started(Run(make_flow(*TWO)), Admission(tenant_active=5, tenant_limit=5))
    assert run.types == ["RunRequested", "RunQueued", "RunQuotaExceeded"]
    assert status(run) == RunStatus.QUOTA_EXCEEDED and run.state is not None and run.state.terminal


SCHEMA = {"type": "object", "required": ["order_id"], "properties": {"order_id": {"type": "string"}}}


@pytest.mark.parametrize(("payload", "path"), [({}, None), ({"order_id": 7}, "order_id"), ("text", None)])
def test_an_input_that_breaks_the_schema_is_invalid_with_every_reason(payload: Any, path: str | None) -> None:
    run = started(Run(make_flow(*TWO, input_schema=SCHEMA), make_trigger(payload=payload)))
    assert run.types == ["RunRequested", "RunInvalid"]
    invalid = run.events[-1].payload
    assert "input schema" in invalid.reason and invalid.errors[0].field_path == path
    assert invalid.errors[0].category == "VALIDATION"


def test_a_broken_input_schema_is_reported_not_raised() -> None:
    run = started(Run(make_flow(*TWO, input_schema={"type": "nonsense"}), make_trigger(payload={})))
    assert run.types == ["RunRequested", "RunInvalid"]
    assert run.events[-1].payload.errors[0].code == "invalid_input_schema"


# ---------------------------------------------------------------- human input


APPROVAL = ({"name": "prepare"}, {"name": "approve", "action": "human_input", "input": {"q": "ok?"}, "timeout_s": 60},
            {"name": "ship", "input": {"output": {"yes": "{{ steps.approve.output.approved }}"}}})  # fmt: skip


def paused() -> Run:
    run = started(Run(make_flow(*APPROVAL)))
    run.complete(output={"order": 1})
    assert status(run) == RunStatus.PAUSED
    return run


def test_human_input_pauses_with_a_request_id_and_expiry() -> None:
    run = paused()
    pause = run.events[-1].payload
    assert run.types[-2:] == ["StepStarted", "RunPaused"]
    assert pause.step == "approve" and pause.prompt == {"q": "ok?"} and pause.request_id.startswith("req_")
    assert pause.expires_at == run.now + timedelta(seconds=60)
    assert paused().events[-1].payload.request_id == pause.request_id  # the same after a replay


def test_a_resume_with_the_request_id_continues_with_the_answer_as_output() -> None:
    run = paused()
    request_id = run.events[-1].payload.request_id
    wrong = ResumeRun(tenant_id="t1", run_id="run-1", request_id="req_other", payload={})
    assert run.feed(CommandInput(wrong)) == []
    other_tenant = ResumeRun(tenant_id="t2", run_id="run-1", request_id=request_id, payload={})
    assert run.feed(CommandInput(other_tenant)) == []

    answer = ResumeRun(tenant_id="t1", run_id="run-1", request_id=request_id, payload={"approved": True})
    run.feed(CommandInput(answer))
    assert run.types[-3:] == ["RunResumed", "StepSucceeded", "StepStarted"]
    assert run.of_type("StepSucceeded")[-1].payload.output == {"approved": True}
    run.complete(output={"yes": True})
    assert status(run) == RunStatus.SUCCEEDED
    assert run.feed(CommandInput(answer)) == []  # a redelivered resume changes nothing


def test_an_unanswered_request_times_out_the_run() -> None:
    run = paused()
    pause = run.events[-1].payload
    run.now = pause.expires_at
    run.feed(PauseExpired("run-1", pause.request_id))
    assert run.types[-2:] == ["StepFailed", "RunTimedOut"] and status(run) == RunStatus.TIMED_OUT
    assert run.events[-1].payload.failed_step == "approve"


# ---------------------------------------------------------------- timeouts and cancel


def test_a_step_timeout_that_is_not_retried_ends_the_run_timed_out() -> None:
    run = started(Run(make_flow({"name": "call", "retry": {"delays_s": []}})))
    timeout = error("TRANSIENT", "step timed out after 1s").model_copy(update={"code": "timeout"})
    run.complete(ok=False, err=timeout)
    assert run.types[-2:] == ["StepFailed", "RunTimedOut"]


def test_the_flow_deadline_fails_the_running_step_and_names_it() -> None:
    run = started(Run(make_flow(*TWO, timeout_s=30)))
    run.now += timedelta(seconds=31)
    run.feed(DeadlinePassed("run-1"))
    # The running step is the one the timeout names: it fails with the run's error, and the run says which it was.
    assert run.types[-2:] == ["StepFailed", "RunTimedOut"]
    ended = run.events[-1].payload
    assert ended.failed_step == "fetch" and ended.error.code == "flow_timeout"
    assert ended.error.message == "the flow timeout of 30s passed while step 'fetch' was running"
    assert started(Run(make_flow(*TWO))).feed(DeadlinePassed("run-1")) == []  # no flow timeout: nothing


@pytest.mark.parametrize("where", ["running", "retrying", "paused", "scheduled", "blocked"])
def test_cancel_ends_the_run_from_any_waiting_status_and_cancels_its_step(where: str) -> None:
    if where == "paused":
        run = paused()
    elif where == "scheduled":
        run = started(Run(make_flow(*TWO), make_trigger(run_at=T0 + timedelta(hours=1))))
    elif where == "blocked":
        run = started(Run(make_flow(*TWO, concurrency_limit=1)), Admission(flow_active=1))
    else:
        run = started(Run(make_flow(*TWO)))
        if where == "retrying":
            run.complete(ok=False, err=error("TRANSIENT"))
    cancel = CancelRun(tenant_id="t1", run_id="run-1", reason="not needed", issued_by="key_9", bulk_operation_id="b1")
    run.feed(CommandInput(cancel))
    assert status(run) == RunStatus.CANCELED and run.types[-1] == "RunCanceled"
    requested = run.of_type("RunCancelRequested")[0].payload
    assert (requested.reason, requested.requested_by, requested.bulk_operation_id) == ("not needed", "key_9", "b1")
    assert run.state is not None
    assert not [s for s in run.state.steps.values() if s.status in (StepStatus.RUNNING, StepStatus.RETRYING)]


def test_a_step_result_after_a_cancel_is_ignored() -> None:
    run = started(Run(make_flow(*TWO)))
    run.feed(CommandInput(CancelRun(tenant_id="t1", run_id="run-1")))
    before = len(run.events)
    with pytest.raises(AssertionError):
        run.complete(output={})  # the step is no longer running
    assert len(run.events) == before


# ---------------------------------------------------------------- subflows


SPAWN = ({"name": "spawn", "action": "subflow", "input": {"flow_id": "child"}}, {"name": "after"})


def child_ended(status_: str, fail_parent: bool = True) -> Run:
    steps = list(SPAWN)
    if not fail_parent:
        steps[0] = {**SPAWN[0], "input": {"flow_id": "child", "fail_parent_on_failure": False}}
    run = started(Run(make_flow(*steps)))
    run.feed(CommandInput(ChildRunFinished(tenant_id="t1", run_id="run-1", child_run_id="run_child_1", step="spawn",
                                           attempt=1, status=status_, output={"n": 2})))  # fmt: skip
    return run


def test_a_child_that_succeeds_completes_the_waiting_step_with_its_output() -> None:
    run = child_ended("SUCCEEDED")
    spawn = run.of_type("StepSucceeded")[0].payload
    assert spawn.output == {"child_run_id": "run_child_1", "status": "SUCCEEDED", "output": {"n": 2}}
    assert run.types[-1] == "StepStarted"  # the next step


def test_a_failed_child_fails_the_parent_unless_told_otherwise() -> None:
    strict = child_ended("FAILED")
    assert status(strict) == RunStatus.FAILED and strict.events[-1].payload.error.code == "subflow_failed"
    lenient = child_ended("FAILED", fail_parent=False)
    assert lenient.of_type("StepSucceeded")[0].payload.output["status"] == "FAILED"


# ---------------------------------------------------------------- retries and records


def test_a_retry_from_the_failed_step_reuses_outputs_and_runs_the_rest() -> None:
    trigger = make_trigger(retry_of="run-0", retry_strategy=RetryStrategy.FROM_FAILED_STEP, reuse={"fetch": {"a": 1}})
    run = started(Run(make_flow(*TWO), trigger))
    reused = run.of_type("StepSucceeded")[0].payload
    assert (reused.step, reused.output, reused.reused_from) == ("fetch", {"a": 1}, "run-0")
    assert run.of_type("StepStarted")[0].payload.step == "push"
    assert run.events[0].payload.retry_of == "run-0"


SYNC = {"name": "sync", "action": "sync_records", "input": {"source": {"kind": "http", "url": "http://x"}}}
WINDOW = CursorWindow(updated_since=T0 - timedelta(hours=1), updated_until=T0)


def test_a_sync_step_gets_the_run_window_and_failed_records_make_the_run_partial() -> None:
    run = started(Run(make_flow(SYNC), make_trigger(cursor_window=WINDOW, only_keys={"sync": ["1003"]})))
    step_input = run.of_type("StepStarted")[0].payload.input
    assert step_input["window"] == WINDOW.model_dump(mode="json") and step_input["only_keys"] == ["1003"]
    output = {
        "counters": {"read": 3, "transformed": 3, "written": 2, "deduped": 0, "skipped": 0, "failed": 1},
        "failures": [{"record_key": "1003", "field_path": "email", "error": "missing", "raw_error": {"status": 400}}],
        "upserts": [{"external_ids": {"shopify": "1001"}, "data": {"total": 5}}],
        "entity": "order",
        "sample": [],
    }
    run.complete(output=output)
    assert run.types[-5:] == ["RecordsProcessed", "RecordFailed", "RecordsUpserted", "StepSucceeded",
                              "RunPartiallySucceeded"]  # fmt: skip
    failed = run.of_type("RecordFailed")[0].payload
    assert (failed.record_key, failed.field_path, failed.raw_error) == ("1003", "email", {"status": 400})
    assert "failures" not in run.of_type("StepSucceeded")[0].payload.output  # records live in their own events
    assert status(run) == RunStatus.PARTIAL


def test_retries_failures_and_pauses_are_explained_in_log_lines_with_levels() -> None:
    run = started(Run(make_flow({"name": "call", "retry": {"delays_s": [5]}})))
    run.complete(ok=False, err=error("TRANSIENT", "HTTP 503"))
    run.fire_timer()
    run.complete(ok=False, err=error("TRANSIENT", "HTTP 503"))
    lines = [(e.payload.level, e.payload.step, e.payload.message) for e in run.logs]
    assert (
        lines[0][:2] == ("WARNING", "call") and "attempt 1 failed (TRANSIENT): HTTP 503; next attempt at" in lines[0][2]
    )
    assert lines[1] == ("ERROR", "call", "failed after 2 attempts (TRANSIENT): HTTP 503")
    assert [e.seq for e in run.ledger] == list(range(len(run.ledger)))  # log lines take their place in seq
    assert paused().logs[0].payload.level == "INFO" and "waiting for input" in paused().logs[0].payload.message
    assert run_logs_of_a_clean_run() == []


def run_logs_of_a_clean_run() -> list[Any]:
    run = started(Run(make_flow(*TWO)))
    run.complete(output={})
    run.complete(output={})
    return run.logs


def test_an_auth_error_marks_the_connectors_the_step_names_degraded() -> None:
    step = {
        "name": "push",
        "action": "sync_records",
        "input": {"source": {"connector": "shopify"}, "destination": {"connector": "netsuite"}},
    }
    run = started(Run(make_flow(step)))
    run.complete(ok=False, err=error("AUTH", "401 token revoked"))
    degraded = [e.payload for e in run.of_type("ConnectorDegraded")]
    assert [(d.connector, d.step, d.error.message) for d in degraded] == [
        ("shopify", "push", "401 token revoked"),
        ("netsuite", "push", "401 token revoked"),
    ]
    assert run.types[-2:] == ["StepFailed", "RunFailed"]  # AUTH is not retried
    other = started(Run(make_flow({"name": "call", "input": {"connector": "crm"}})))
    other.complete(ok=False, err=error("VALIDATION"))
    assert other.of_type("ConnectorDegraded") == []


def test_a_quota_error_degrades_the_connector_and_is_still_retried() -> None:
    """Seed 003: auth *or quota* errors degrade a connector; a 429 stays TRANSIENT, so the step is retried."""
    run = started(Run(make_flow({"name": "call", "input": {"connector": "crm"}, "retry": {"delays_s": [1, 1]}})))
    throttled = ErrorInfo(category=ErrorCategory.TRANSIENT, message="429 Too Many Requests", status_code=429)
    run.complete(ok=False, err=throttled)
    degraded = [e.payload for e in run.of_type("ConnectorDegraded")]
    assert [(d.connector, d.error.status_code) for d in degraded] == [("crm", 429)]
    assert run.types[-1] == "StepAttemptFailed"  # retried, not failed
    unavailable = started(Run(make_flow({"name": "call", "input": {"connector": "crm"}})))
    unavailable.complete(ok=False, err=ErrorInfo(category=ErrorCategory.TRANSIENT, message="503", status_code=503))
    assert unavailable.of_type("ConnectorDegraded") == []


def test_the_harness_checks_every_transition_against_the_table() -> None:
    """Every run this module and test_executor_decide drive is checked event by event (tests/unit/drive.py); the check
    refuses what the table forbids, so a decide that emitted it would fail those tests."""
    from tests.unit.drive import _check_transition

    run = started(Run(make_flow(*TWO)))
    run.complete(output={})
    run.complete(output={})
    assert run.state is not None and run.state.status == RunStatus.SUCCEEDED
    restarted = next(e for e in run.events if e.type == "RunStarted")
    with pytest.raises(AssertionError, match="SUCCEEDED -> RUNNING"):
        _check_transition(run.state, restarted)
