"""The executor's per-event shortcuts give what the plain library calls give: event ids (uuid5), the fold's state
copies (dataclasses.replace), and the ledger record bytes (the one codec)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from typing import Any

import orjson

from schemas import codec
from schemas.status import RunStatus, StepStatus
from services.executor.decide.emitter import EVENT_NS, event_id
from services.executor.fold import RunState, StepState, _replace_run, _replace_step, fold_all
from tests.unit.drive import T0, Run, error, make_flow, make_trigger


def test_event_ids_are_the_uuid5_of_run_and_seq() -> None:
    run_ids = ["run-1", "run_0193a1b2c3d4e5f60718293a", "ünïcode-run", "", "x" * 200]
    for run_id in run_ids:
        for seq in (0, 1, 9, 10, 255, 1_000_000):
            assert event_id(run_id, seq) == uuid.uuid5(EVENT_NS, f"{run_id}:{seq}").hex
    parsed = uuid.UUID(event_id("run-1", 0))
    assert parsed.version == 5 and parsed.variant == uuid.RFC_4122


def test_the_folds_copies_equal_dataclasses_replace() -> None:
    run = Run(make_flow({"name": "fetch"}, {"name": "push"}), make_trigger("run-r"))
    run.start()
    state = run.state
    assert state is not None and state.steps
    changes: dict[str, Any] = {"next_seq": 42, "status": RunStatus.RUNNING, "vars": {"a": 1}, "started_at": T0}
    assert _replace_run(state, changes) == dataclasses.replace(state, **changes)
    assert _replace_run(state, {}) == state
    step = next(iter(state.steps.values()))
    step_changes: dict[str, Any] = {"status": StepStatus.RETRYING, "attempt": 2, "retry_at": T0 + timedelta(seconds=1)}
    assert _replace_step(step, step_changes) == dataclasses.replace(step, **step_changes)
    # Each field lands where it belongs, whichever one changes.
    for f in dataclasses.fields(RunState):
        assert getattr(_replace_run(state, {f.name: "changed"}), f.name) == "changed", f.name
    for f in dataclasses.fields(StepState):
        assert getattr(_replace_step(step, {f.name: "changed"}), f.name) == "changed", f.name


def test_a_run_folded_with_retries_equals_its_ledger_folded_again() -> None:
    run = Run(make_flow({"name": "fetch", "retry": {"delays_s": [1]}}, {"name": "push"}), make_trigger("run-f"))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT"))
    assert run.state is not None and run.state.steps["fetch"].status == StepStatus.RETRYING
    run.fire_timer()
    run.complete(output={"ok": True})
    run.complete(output={"n": 2})
    assert run.state is not None and run.state.status == RunStatus.SUCCEEDED
    assert fold_all(run.ledger) == run.state
    # What the ledger holds decodes to the same events (the wire format is the codec's).
    assert [codec.decode_ledger_event(codec.dumps(e)) for e in run.ledger] == run.ledger
    assert all(orjson.loads(codec.dumps(e))["event_id"] == e.event_id for e in run.ledger)
