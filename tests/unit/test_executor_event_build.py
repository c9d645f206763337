"""The events the executor builds without validating them again (decide.emitter.build_event) and encodes in one pass
(adapters.ledger.encode_event) are the events and the bytes the validating constructor and `codec.dumps` give: every
ledger event type, the runs decide drives, odd numbers and strings. Readers of the ledger see no difference. The
fold's generated state copies (services/executor/fold.py) are as frozen as the states they copy."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from pydantic import ValidationError

from schemas import codec
from schemas import events as ev
from schemas.events import EventBase
from schemas.status import RunStatus, StepStatus
from services.executor.adapters.ledger import encode_event
from services.executor.decide import CommandInput
from services.executor.decide.emitter import _GIVEN, build_event
from services.executor.fold import fold_all
from tests.unit.drive import Run, error, make_flow, make_trigger
from tests.unit.test_codec import ledger_events


def _given(event: EventBase) -> dict[str, Any]:
    """The fields the emitter passes (the rest, type and schema_version, take the class's defaults)."""
    return {name: getattr(event, name) for name in _GIVEN}


def _assert_same_as_validated(event: EventBase) -> None:
    validated = type(event)(**_given(event))
    assert event == validated
    assert list(event.__dict__) == list(validated.__dict__)  # the order the serialiser writes fields in
    assert event.model_fields_set == validated.model_fields_set
    assert event.model_extra is None and validated.model_extra is None
    assert encode_event(event) == codec.dumps(validated)
    # What a reader decodes is what it decoded before (an output's inf is null, a time in it a string, either way).
    assert codec.decode_ledger_event(encode_event(event)) == codec.decode_ledger_event(codec.dumps(validated))
    with pytest.raises(ValidationError):  # as frozen as a validated event
        event.seq = 99  # type: ignore[misc]


@settings(max_examples=400, deadline=None)
@given(event=ledger_events)
def test_every_event_type_built_without_validation_equals_the_validated_one(event: EventBase) -> None:
    built = build_event(type(event), event.payload, **{k: v for k, v in _given(event).items() if k != "payload"})
    _assert_same_as_validated(built)


def _runs() -> list[Run]:
    """Runs decide drives through most of what it emits: steps succeeded, skipped, retried, failed, a pause, a
    cancel, a run refused for its input and one whose flow does not exist."""
    ok = Run(make_flow(*({"name": f"s{i}", "input": {"output": {"i": i}}} for i in range(10))), make_trigger("r-ok"))
    ok.start()
    for i in range(10):
        ok.complete(output={"i": i, "f": 0.1 * i, "t": "é\u2028"}, took_s=0.001 * i)
    retried = Run(make_flow({"name": "a", "retry": {"delays_s": [1]}}, {"name": "b", "run_condition": "`false`"},
                            {"name": "c"}), make_trigger("r-retry", payload={"n": 1}))  # fmt: skip
    retried.start()
    retried.complete(ok=False, err=error("TRANSIENT"))
    retried.fire_timer()
    retried.complete(output={"x": [1, 2.5, None]})
    retried.complete(ok=False, err=error("VALIDATION", "no"))
    paused = Run(make_flow({"name": "ask", "action": "human_input", "timeout_s": 60}), make_trigger("r-pause"))
    paused.start()
    canceled = Run(make_flow({"name": "a"}), make_trigger("r-cancel"))
    canceled.start()
    assert canceled.state is not None
    canceled.feed(CommandInput(ev.CancelRun(tenant_id=canceled.state.tenant_id, run_id="r-cancel")))
    invalid = Run(make_flow({"name": "a"}, input_schema={"type": "object", "required": ["n"]}), make_trigger("r-bad"))
    invalid.start()
    missing = Run(None, make_trigger("r-none"))
    missing.start()
    return [ok, retried, paused, canceled, invalid, missing]


def test_the_events_decide_emits_equal_the_validated_ones_and_encode_to_the_same_bytes() -> None:
    seen: set[str] = set()
    for run in _runs():
        for event in run.ledger:
            _assert_same_as_validated(event)
            seen.add(event.type)
    expected = {"RunRequested", "RunQueued", "RunStarted", "StepStarted", "StepSucceeded", "StepSkipped",
                "StepAttemptFailed", "StepFailed", "LogEmitted", "RunSucceeded", "RunFailed", "RunPaused",
                "RunCanceled", "RunInvalid"}  # fmt: skip
    assert expected <= seen, expected - seen


@pytest.mark.parametrize(
    "value", [0.1, 1 / 3, 1e16, 1e21, 1e22, 1e-7, 5e-324, 1e300, -0.0, 2.0**53, 12345678912345678.0, math.inf,
              math.nan, 10**18, -(2**63), 'é\u2028\x00"\\<>&\U0001f600', datetime(2024, 5, 1, 1, 2, 3, 4, tzinfo=UTC)],
)  # fmt: skip
def test_odd_numbers_strings_and_times_in_an_output_encode_to_the_same_bytes(value: Any) -> None:
    run = Run(make_flow({"name": "a"}), make_trigger("r-odd"))
    run.start()
    (succeeded, _) = run.complete(output={"v": value, "l": [value, {"k": value}]})
    assert isinstance(succeeded, ev.StepSucceeded)
    _assert_same_as_validated(succeeded)


def test_a_payload_of_another_event_type_is_refused() -> None:
    payload = ev.StepSkippedPayload(step="s")
    envelope = {k: v for k, v in _given(ev.StepCanceled(tenant_id="t", run_id="r", flow_id="f", flow_version=1, seq=1,
                causation_id="c", correlation_id="r", payload=ev.StepCanceledPayload(step="s"))).items()
                if k != "payload"}  # fmt: skip
    with pytest.raises(TypeError, match="StepCanceled takes a StepCanceledPayload, not StepSkippedPayload"):
        build_event(ev.StepCanceled, payload, **envelope)


def test_the_folds_copies_are_frozen_and_leave_the_original_as_it_was() -> None:
    run = Run(make_flow({"name": "a"}, {"name": "b"}), make_trigger("r-copy"))
    run.start()
    before = run.state
    assert before is not None and before.steps["a"].status == StepStatus.RUNNING
    run.complete(output={"x": 1})
    after = run.state
    assert after is not None and after is not before
    assert before.next_seq < after.next_seq and before.steps["a"].status == StepStatus.RUNNING
    assert after.steps["a"].status == StepStatus.SUCCEEDED and after.steps["b"].status == StepStatus.RUNNING
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.status = RunStatus.FAILED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.steps["a"].attempt = 2  # type: ignore[misc]
    assert fold_all(run.ledger) == after
