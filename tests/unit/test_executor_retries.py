"""The executor's retries: which failures are retried, when the next attempt runs, what a retried attempt keeps
(docs/architecture.md#vocabulary: error categories), decided by decide/fold with a fake clock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from schemas.status import RunStatus, StepStatus
from tests.unit.drive import Run, error, make_flow


def test_transient_errors_are_retried_on_the_default_backoff_schedule() -> None:
    run = Run(make_flow({"name": "a"}))
    run.start()
    delays = [1, 5, 30, 300, 1800, 7200]
    for attempt, delay in enumerate(delays, start=1):
        run.complete(ok=False, err=error("TRANSIENT"), took_s=0)
        failed = run.events[-1]
        assert failed.type == "StepAttemptFailed"
        assert failed.payload.attempt == attempt
        assert failed.payload.retry_at == run.now + timedelta(seconds=delay)
        run.fire_timer()
        started = run.events[-1]
        assert (started.type, started.payload.attempt, started.payload.position) == ("StepStarted", attempt + 1, 0)
        assert started.occurred_at == failed.payload.retry_at
    # The attempt after the last delay is the last one.
    run.complete(ok=False, err=error("TRANSIENT", "still down"), took_s=0)
    assert run.types[-2:] == ["StepFailed", "RunFailed"]
    assert run.events[-2].payload.attempt == 7
    assert run.events[-1].payload.error.message == "still down"
    assert run.state.status == RunStatus.FAILED  # type: ignore[union-attr]


def test_a_step_that_recovers_after_a_transient_error_succeeds() -> None:
    run = Run(make_flow({"name": "a"}, {"name": "b"}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"))
    assert run.state.steps["a"].status == StepStatus.RETRYING  # type: ignore[union-attr]
    run.fire_timer()
    run.complete(output="ok")
    run.complete()
    assert run.types[3:] == ["StepStarted", "StepAttemptFailed", "StepStarted", "StepSucceeded", "StepStarted",
                             "StepSucceeded", "RunSucceeded"]  # fmt: skip
    assert run.of_type("StepSucceeded")[0].payload.attempt == 2


def test_a_retried_attempt_keeps_what_the_upstream_answered() -> None:
    run = Run(make_flow({"name": "a"}))
    run.start()
    answer = {"status": 503, "body": "upstream busy"}
    run.complete(ok=False, output=answer, err=error("TRANSIENT", "GET … answered 503"))
    failed = run.events[-1]
    assert failed.type == "StepAttemptFailed" and failed.payload.output == answer
    run.fire_timer()
    run.complete(output={"status": 200})
    assert run.of_type("StepSucceeded")[0].payload.output == {"status": 200}


@pytest.mark.parametrize("category", ["AUTH", "VALIDATION", "INTERNAL"])
def test_non_retryable_errors_fail_the_step_at_once(category: str) -> None:
    run = Run(make_flow({"name": "a"}, {"name": "b"}))
    run.start()
    run.complete(ok=False, err=error(category, "401 Unauthorized"), output={"status": 401})
    assert run.types[-2:] == ["StepFailed", "RunFailed"]
    failed = run.events[-2].payload
    assert (failed.attempt, failed.error.category, failed.output) == (1, category, {"status": 401})
    final = run.events[-1].payload
    assert final.failed_step == "a" and final.error.message == "401 Unauthorized"


def test_conflict_is_retried_once() -> None:
    run = Run(make_flow({"name": "a"}))
    run.start()
    run.complete(ok=False, err=error("CONFLICT"), took_s=0)
    assert run.events[-1].type == "StepAttemptFailed"
    assert run.events[-1].payload.retry_at == run.now + timedelta(seconds=1)
    run.fire_timer()
    run.complete(ok=False, err=error("CONFLICT"))
    assert run.types[-2:] == ["StepFailed", "RunFailed"]
    assert run.events[-2].payload.attempt == 2


def test_conflict_is_not_retried_when_the_policy_says_so() -> None:
    run = Run(make_flow({"name": "a", "retry": {"retry_conflict_once": False}}))
    run.start()
    run.complete(ok=False, err=error("CONFLICT"))
    assert run.types[-2:] == ["StepFailed", "RunFailed"]


def test_step_retry_policy_overrides_the_flows() -> None:
    run = Run(make_flow({"name": "a", "retry": {"delays_s": [2]}}, retry={"delays_s": [10, 10, 10]}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"), took_s=0)
    assert run.events[-1].payload.retry_at == run.now + timedelta(seconds=2)
    run.fire_timer()
    run.complete(ok=False, err=error("TRANSIENT"))
    assert run.types[-2:] == ["StepFailed", "RunFailed"]


def test_flow_retry_policy_applies_to_steps_without_one() -> None:
    run = Run(make_flow({"name": "a"}, retry={"delays_s": []}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"))
    assert run.types[-2:] == ["StepFailed", "RunFailed"]


def test_retry_delays_follow_the_clock_time_scale() -> None:
    run = Run(make_flow({"name": "a"}), time_scale=0.01)
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"), took_s=0)
    run.fire_timer()
    run.complete(ok=False, err=error("TRANSIENT"), took_s=0)
    assert run.events[-1].payload.retry_at == run.now + timedelta(seconds=5 * 0.01)


def test_no_retry_scheduled_past_max_elapsed() -> None:
    # One attempt, then a retry an hour later would end past the 30 minutes allowed: the step fails now.
    run = Run(make_flow({"name": "a", "retry": {"delays_s": [3600], "max_elapsed_s": 1800}}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"))
    assert run.types[-2:] == ["StepFailed", "RunFailed"]


def test_max_elapsed_counts_from_the_steps_first_attempt() -> None:
    policy = {"delays_s": [600] * 10, "max_elapsed_s": 1500}  # 10-minute delays, 25 minutes in all
    run = Run(make_flow({"name": "a", "retry": policy}))
    run.start()
    first_start = run.now
    for _ in range(10):
        run.complete(ok=False, err=error("TRANSIENT"), took_s=0)
        if run.events[-1].type != "StepAttemptFailed":
            break
        run.fire_timer()
    # Attempts start at 0, 10 and 20 minutes; a 4th would start at 30 minutes, past the 25 allowed.
    assert run.types[-2:] == ["StepFailed", "RunFailed"]
    assert run.events[-2].payload.attempt == 3
    assert (run.now - first_start) <= timedelta(seconds=1500)


def test_retry_at_is_kept_in_the_state_for_the_durable_timer() -> None:
    run = Run(make_flow({"name": "a"}))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"), took_s=0)
    step = run.state.steps["a"]  # type: ignore[union-attr]
    assert step.status == StepStatus.RETRYING and step.retry_at == run.now + timedelta(seconds=1)
    assert step.error is not None and step.error.category == "TRANSIENT"
