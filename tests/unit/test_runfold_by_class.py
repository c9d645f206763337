"""The folds (services/common/runfold) find each event's part by its exact class: that sees every event a match
statement's class patterns would only while no ledger event class has a subclass."""

from __future__ import annotations

from schemas.events import EventBase
from schemas.events.ledger import LEDGER_EVENTS_BY_TYPE
from services.common.runfold.details import plan_details
from services.common.runfold.rows import plan
from tests.factories import run_events


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    direct_subclasses: list[type] = cls.__subclasses__()
    for direct in direct_subclasses:
        out += [direct, *_subclasses(direct)]
    return out


def test_no_ledger_event_class_has_a_subclass() -> None:
    ledger_classes = set(LEDGER_EVENTS_BY_TYPE.values())
    assert ledger_classes and ledger_classes <= set(_subclasses(EventBase))
    assert {c.__name__: _subclasses(c) for c in ledger_classes if _subclasses(c)} == {}


def test_a_failed_run_folds_into_its_row_its_failed_step_and_its_attempts() -> None:
    events = run_events("run-1", steps=3, fail_at=1)
    rows, details = plan(events), plan_details(events)
    row = rows.new_runs["run-1"]
    assert (row["status"], row["failed_step"], row["steps_count"], row["last_seq"]) == ("FAILED", "step1", 2, 7)
    assert row["error_message"] == "step1 rejected the record" and row["duration_ms"] == 42.0
    assert {s: c.status for (_, s), c in rows.step_changes.items()} == {"step0": "SUCCEEDED", "step1": "FAILED"}
    assert {k[1]: a.status for k, a in details.attempts.items()} == {"step0": "SUCCEEDED", "step1": "FAILED"}
    assert details.finished == ["run-1"] and details.failures["run-1"].category == "VALIDATION"
    assert [g["message"] for g in details.logs] == [
        "step step0 started (transform, attempt 1)", "step step0 succeeded in 1 ms (attempt 1)",
        "step step1 started (transform, attempt 1)",
    ]  # fmt: skip
