"""The projector's plan(): a batch of ledger events becomes one row change per run and one per step."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import EventBase
from services.common.runfold.details import plan_details
from services.common.runfold.rows import BatchPlan, StepChange, plan
from services.projector.adapters import store
from tests.factories import run_events
from tests.unit.drive import T0, Run, error, make_flow, make_trigger, retried_step_log


def decided_run(run_id: str = "run-1", *, retry_first: bool = False, fail_last: bool = False) -> list[EventBase]:
    """A 3-step run's events as the executor writes them (positions included)."""
    run = Run(make_flow({"name": "fetch"}, {"name": "gate", "run_condition": "`false`"}, {"name": "push"},
                        {"name": "notify"}), make_trigger(run_id, payload={"n": 1}))  # fmt: skip
    run.start()
    if retry_first:
        run.complete(ok=False, err=error("TRANSIENT", "502 Bad Gateway"))
        run.fire_timer()
    run.complete(output={"fetched": 1})
    run.complete(output={"pushed": True})
    if fail_last:
        run.complete(ok=False, err=error("VALIDATION", "rejected"), output={"status": 422})
    else:
        run.complete(output={"sent": True})
    return run.events


# ---------------------------------------------------------------- one batch


def test_a_whole_run_in_one_batch_is_one_insert_and_one_change_per_step() -> None:
    events = decided_run()
    p = plan(events)
    assert list(p.new_runs) == ["run-1"] and p.run_changes == {}
    row = p.new_runs["run-1"]
    assert row["status"] == "SUCCEEDED"
    assert (row["tenant_id"], row["flow_id"], row["flow_version"], row["flow_name"]) == ("t1", "orders", 3, "Orders")
    assert (row["trigger_type"], row["caller"], row["trigger_payload"]) == ("api", "key_1", {"n": 1})
    assert row["tags"] == ["sales"] and row["environment"] == "PRODUCTION" and row["execution_mode"] == "async"
    assert row["steps_count"] == 4  # three run, one skipped
    assert row["created_at"] == T0 and row["started_at"] == T0
    assert row["finished_at"] == events[-1].occurred_at == row["updated_at"]
    assert row["duration_ms"] == pytest.approx(3000)
    assert row["last_seq"] == len(events) - 1
    assert row.get("failed_step") is None and row.get("error") is None
    steps = {s: c for (_, s), c in p.step_changes.items()}
    assert [(s, c.position, c.status) for s, c in sorted(steps.items(), key=lambda kv: kv[1].position)] == [
        ("fetch", 0, "SUCCEEDED"), ("gate", 1, "SKIPPED"), ("push", 2, "SUCCEEDED"), ("notify", 3, "SUCCEEDED"),
    ]  # fmt: skip
    push = steps["push"]
    assert (push.action, push.attempt, push.output, push.error) == ("transform", 1, {"pushed": True}, None)
    assert push.started_at is not None and push.finished_at == push.started_at + timedelta(seconds=1)
    assert push.duration_ms == 1000 and push.assertions == [] and push.extractions == {}


def test_a_failed_run_records_the_failed_step_and_error() -> None:
    p = plan(decided_run(fail_last=True))
    row = p.new_runs["run-1"]
    assert row["status"] == "FAILED" and row["failed_step"] == "notify"
    assert row["error_message"] == "rejected"
    assert row["error"] == {"category": "VALIDATION", "message": "rejected", "code": None, "status_code": None,
                            "field_path": None, "details": {}}  # fmt: skip
    notify = p.step_changes[("run-1", "notify")]
    assert notify.status == "FAILED" and notify.output == {"status": 422} and notify.error["message"] == "rejected"


def test_a_skipped_step_shows_its_action_input_and_reason() -> None:
    gate = plan(decided_run()).step_changes[("run-1", "gate")]
    assert (gate.status, gate.action, gate.input) == ("SKIPPED", "transform", {})
    assert gate.reason == 'run_condition "`false`" was false'
    assert gate.finished_at is not None and gate.started_at is None


def test_a_skipped_step_of_an_older_event_keeps_its_reason_only() -> None:
    events = decided_run()
    old = next(e for e in events if e.type == "StepSkipped")
    payload = old.payload.model_copy(update={"action": None, "input": None, "reason": "run_condition false: `false`"})
    at = events.index(old)
    gate = plan([*events[:at], old.model_copy(update={"payload": payload}), *events[at + 1 :]]).step_changes[
        ("run-1", "gate")
    ]
    assert (gate.action, gate.input, gate.reason) == (None, None, "run_condition false: `false`")


def test_every_attempt_keeps_its_output_and_each_step_event_reads_as_an_info_line() -> None:
    run = Run(make_flow({"name": "fetch"}, {"name": "gate", "run_condition": "`false`"}), make_trigger("run-1"))
    run.start()
    run.complete(ok=False, err=error("TRANSIENT", "503 Service Unavailable"), output={"status": 503, "body": "busy"})
    run.fire_timer()
    run.complete(output={"status": 200, "body": {"ok": True}}, took_s=0.25)
    details = plan_details(run.ledger)
    first, second = (details.attempts[("run-1", "fetch", n)] for n in (1, 2))
    assert (first.status, first.output) == ("FAILED", {"status": 503, "body": "busy"})
    assert (second.status, second.output) == ("SUCCEEDED", {"status": 200, "body": {"ok": True}})
    # The derived lines sit at their events' seqs, among the executor's own (the retry's WARNING): one log in seq order.
    lines = sorted(details.logs, key=lambda line: line["seq"])
    assert [(line["level"], line["message"]) for line in lines] == [
        *retried_step_log("fetch", "transform", 250, lines[1]["message"]),
        ("INFO", 'step gate skipped: run_condition "`false`" was false'),
    ]
    assert lines[1]["message"].startswith("attempt 1 failed (TRANSIENT)")
    by_seq = {e.seq: e for e in run.ledger}
    assert [by_seq[line["seq"]].type for line in lines] == [
        "StepStarted", "LogEmitted", "StepStarted", "StepSucceeded", "StepSkipped",
    ]  # fmt: skip
    assert lines[3]["fields"] == {"attempt": 2, "duration_ms": 250.0} and lines[3]["step"] == "fetch"
    assert lines[4]["fields"] == {"reason": 'run_condition "`false`" was false'}
    assert len({line["seq"] for line in lines}) == len(lines)


def test_a_reused_step_reads_as_reused_not_as_run() -> None:
    run = Run(make_flow({"name": "fetch"}, {"name": "push"}),
              make_trigger("run-2", retry_of="run-1", reuse={"fetch": {"n": 1}}))  # fmt: skip
    run.start()
    lines = [line["message"] for line in plan_details(run.ledger).logs]
    assert lines == ["step fetch reused from run run-1, not run again", "step push started (transform, attempt 1)"]


def test_retries_leave_one_step_change_showing_the_last_attempt() -> None:
    p = plan(decided_run(retry_first=True))
    fetch = p.step_changes[("run-1", "fetch")]
    assert (fetch.status, fetch.attempt, fetch.error) == ("SUCCEEDED", 2, None)
    assert p.new_runs["run-1"]["steps_count"] == 4  # attempts are not steps


def test_a_run_invalid_reason_becomes_the_error_message() -> None:
    run = Run(None)
    run.start()
    row = plan(run.events).new_runs["run-1"]
    assert row["status"] == "INVALID" and row["error_message"] == "flow 'orders' does not exist"
    assert row["finished_at"] == T0


def test_interleaved_runs_each_get_their_own_changes() -> None:
    a, b = decided_run("a"), decided_run("b", fail_last=True)
    batch = [e for pair in zip(a, b, strict=True) for e in pair]
    p = plan(batch)
    assert set(p.new_runs) == {"a", "b"}
    assert (p.new_runs["a"]["status"], p.new_runs["b"]["status"]) == ("SUCCEEDED", "FAILED")
    assert len(p.step_changes) == 8 and {r for r, _ in p.step_changes} == {"a", "b"}


def test_position_comes_from_step_started_and_falls_back_after_any_real_position() -> None:
    events = decided_run()
    p = plan(events)
    assert p.step_changes[("run-1", "notify")].position == 3
    # Events written before positions were recorded (tests/factories) sort after every recorded position,
    # in the order the steps first appeared.
    old = plan(run_events("old", steps=3))
    positions = [old.step_changes[("old", f"step{i}")].position for i in range(3)]
    assert positions == sorted(positions) and min(positions) >= 1_000_000


def test_a_step_whose_started_event_came_earlier_does_not_lose_its_position() -> None:
    events = decided_run()
    succeeded = next(e for e in events if e.type == "StepSucceeded" and e.payload.step == "push")
    change = plan([succeeded]).step_changes[("run-1", "push")]
    # No position in this batch: a placeholder the store's LEAST() never prefers over the stored one.
    assert change.position >= 1_000_000 and change.status == "SUCCEEDED"


# ---------------------------------------------------------------- later batches


def test_a_run_requested_in_an_earlier_batch_gets_an_update_not_an_insert() -> None:
    events = decided_run()
    first, second = plan(events[:3]), plan(events[3:])
    assert list(first.new_runs) == ["run-1"] and first.new_runs["run-1"]["status"] == "RUNNING"
    assert second.new_runs == {}
    change = second.run_changes["run-1"]
    assert change.status == "SUCCEEDED" and change.last_seq == len(events) - 1
    assert change.steps_delta == 4 and change.finished_at == events[-1].occurred_at
    assert change.started_at is None  # set by the first batch; None leaves the column as it is


def test_update_only_batches_do_not_touch_columns_they_do_not_know() -> None:
    events = decided_run()
    change = plan(events[4:5]).run_changes["run-1"]  # StepSucceeded of the first step alone
    assert (change.status, change.finished_at, change.error, change.steps_delta) == (None, None, None, 0)
    assert change.last_seq == 4 and change.updated_at == events[4].occurred_at


def test_every_column_plan_sets_on_a_new_run_is_inserted_by_the_store() -> None:
    from schemas import events as ev

    events = decided_run()
    archived = ev.RunArchived(tenant_id="t1", run_id="run-1", flow_id="orders", flow_version=3, seq=len(events),
                              causation_id="cmd-1", correlation_id="run-1", payload={})  # fmt: skip
    row = plan([*events, archived]).new_runs["run-1"]
    assert row["archived"] is True
    assert set(row) <= set(store._RUN_COLUMNS)


def test_archiving_an_existing_run_is_an_update() -> None:
    from schemas import events as ev

    archived = ev.RunArchived(tenant_id="t1", run_id="run-1", flow_id="orders", flow_version=3, seq=20,
                              causation_id="cmd-1", correlation_id="run-1", payload={})  # fmt: skip
    change = plan([archived]).run_changes["run-1"]
    assert change.archived is True and change.status is None


# ---------------------------------------------------------------- any split into batches gives the same rows


def _merge_run(row: dict[str, Any], change: Any) -> None:
    """The store's UPDATE runs: COALESCE for columns, += for steps_count, GREATEST for last_seq."""
    for key in ("status", "started_at", "finished_at", "duration_ms", "failed_step", "error", "error_message"):
        if getattr(change, key) is not None:
            row[key] = getattr(change, key)
    row["steps_count"] = row.get("steps_count", 0) + change.steps_delta
    row["updated_at"] = max(row["updated_at"], change.updated_at)
    row["last_seq"] = max(row["last_seq"], change.last_seq)


def _merge_step(old: dict[str, Any] | None, new: StepChange) -> dict[str, Any]:
    """The store's run_steps upsert (ON CONFLICT DO UPDATE), written out."""
    row = asdict(new)
    if old is None:
        row["attempt"] = row["attempt"] or 1
        return row
    out = dict(old)
    out["position"] = min(new.position, old["position"])
    out["status"] = new.status
    out["attempt"] = max(new.attempt or 1, old["attempt"])
    for key in ("action", "input", "output", "assertions", "extractions", "started_at", "duration_ms", "reason"):
        if row[key] is not None:
            out[key] = row[key]
    out["error"] = None if new.status == "SUCCEEDED" else (new.error if new.error is not None else old["error"])
    out["finished_at"] = None if new.status in ("RUNNING", "RETRYING") else (new.finished_at or old["finished_at"])
    return out


def _apply(plans: list[BatchPlan]) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
    runs: dict[str, Any] = {}
    steps: dict[tuple[str, str], Any] = {}
    for p in plans:
        for run_id, row in p.new_runs.items():
            runs.setdefault(run_id, {"steps_count": 0, **row})
        for run_id, change in p.run_changes.items():
            _merge_run(runs[run_id], change)
        for key, change in p.step_changes.items():
            steps[key] = _merge_step(steps.get(key), change)
    return runs, steps


@settings(max_examples=100, deadline=None)
@given(
    retry_first=st.booleans(),
    fail_last=st.booleans(),
    cuts=st.lists(st.integers(1, 16), max_size=5),
)
def test_any_split_into_batches_gives_the_same_rows_as_one_batch(
    retry_first: bool, fail_last: bool, cuts: list[int]
) -> None:
    events = decided_run(retry_first=retry_first, fail_last=fail_last)
    bounds = [0, *sorted({c for c in cuts if c < len(events)}), len(events)]
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    assert _apply([plan(b) for b in batches]) == _apply([plan(events)])


def test_status_changes_the_transition_table_forbids_are_flagged() -> None:
    from tests.factories import run_events

    events = run_events("run-x", steps=1)
    # A RunQueued after the run already succeeded: SUCCEEDED -> QUEUED is not a transition.
    late = events[1].model_copy(update={"seq": len(events), "event_id": "late"})
    p = plan([*events, late])
    assert p.out_of_order == [("run-x", len(events), "SUCCEEDED", "QUEUED")]
    assert plan(events).out_of_order == []
