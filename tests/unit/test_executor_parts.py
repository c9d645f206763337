"""The engine's pure parts: a partition's replay scan (services/executor/replay.py) and admission's counts and
BLOCKED queues (services/executor/admission.py), fed states and records the real `decide` produced."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson

from schemas import codec
from schemas.status import RunStatus
from services.executor.admission import LiveRuns
from services.executor.decide import Admission, StartRun
from services.executor.finished import FinishedRuns
from services.executor.replay import CHILD_RENOTIFY_WINDOW, PartitionScan
from services.executor.settings import ExecutorSettings
from tests.unit.drive import T0, Run, make_flow, make_trigger

TWO = ({"name": "fetch"}, {"name": "push"})


def raw(run: Run) -> list[dict[str, Any]]:
    """The run's ledger records as the replay reads them: parsed JSON."""
    return [orjson.loads(codec.dumps(e)) for e in run.ledger]


def started(run_id: str, *, admission: Admission | None = None, **flow: Any) -> Run:
    run = Run(make_flow(*TWO, **flow), make_trigger(run_id))
    run.feed(StartRun(run.trigger, 3, admission or Admission()))
    return run


def ended(run_id: str, **trigger: Any) -> Run:
    run = Run(make_flow(*TWO), make_trigger(run_id, **trigger))
    run.start()
    run.complete(output={"n": 1})
    run.complete(output={"n": 2})
    assert run.state is not None and run.state.terminal
    return run


def scan(*batches: list[dict[str, Any]], now: Any = T0) -> tuple[PartitionScan, FinishedRuns, set[str]]:
    finished, archived = FinishedRuns(), set[str]()
    result = PartitionScan(0, finished, archived, now)
    for batch in batches:
        result.take(batch)
    return result, finished, archived


def test_a_replay_rebuilds_open_runs_oldest_first_and_keeps_only_the_next_seq_of_ended_ones() -> None:
    young, old, done = started("run-young"), started("run-old"), ended("run-done")
    records = raw(young)
    for r in records:  # requested five minutes after the others, though its first record is read first
        r["occurred_at"] = (T0 + timedelta(minutes=5)).isoformat()
    result, finished, archived = scan(records[:1], raw(old) + raw(done), records[1:])
    runs = result.open_runs()
    assert [s.run_id for s in runs] == ["run-old", "run-young"]
    assert all(s.status == RunStatus.RUNNING for s in runs)
    assert runs[0].next_seq == len(old.ledger)
    assert finished.get("run-done") == len(done.ledger) and "run-old" not in finished
    assert result.count == len(records) + len(old.ledger) + len(done.ledger) and not archived


def test_a_replay_marks_archived_runs_and_skips_records_without_a_run() -> None:
    done = ended("run-done")
    archive = {**raw(done)[-1], "type": "RunArchived", "seq": len(done.ledger), "payload": {}}
    result, finished, archived = scan(raw(done), [archive, {"type": "RunStarted"}])
    assert archived == {"run-done"} and finished.get("run-done") == len(done.ledger) + 1
    assert result.open_runs() == [] and result.count == len(done.ledger) + 2


def test_a_child_that_ended_recently_is_told_to_its_parent_again_an_old_one_is_not() -> None:
    child = ended("run_child_1", parent_run_id="run-parent", parent_step="spawn", parent_attempt=1)
    recent, _, _ = scan(raw(child), now=child.now + timedelta(hours=1))
    assert [c.run_id for c in recent.ended_children] == ["run_child_1"]
    assert recent.ended_children[0].parent_run_id == "run-parent"
    long_ago, _, _ = scan(raw(child), now=child.now + CHILD_RENOTIFY_WINDOW + timedelta(hours=1))
    assert long_ago.ended_children == []
    assert scan(raw(ended("run-plain")), now=T0)[0].ended_children == []  # not a child: no parent to tell


def test_admission_counts_active_runs_per_flow_and_tenant_and_frees_them_when_a_run_ends() -> None:
    live = LiveRuns(ExecutorSettings(tenant_max_active_runs=5, tenant_quotas={"t1": 2}))
    a, b = started("run-a"), started("run-b")
    assert a.state is not None and b.state is not None
    live.track(None, a.state)
    live.track(None, b.state)
    assert live.admission("t1", "orders") == Admission(2, 2, 2)  # the tenant's own quota overrides the default
    assert live.admission("t2", "orders") == Admission(0, 0, 5)
    live.track(a.state, None)
    assert live.admission("t1", "orders") == Admission(1, 1, 2) and "run-a" not in live and len(live) == 1


def test_blocked_runs_queue_in_arrival_order_and_a_freed_slot_goes_to_the_oldest_still_blocked() -> None:
    live = LiveRuns(ExecutorSettings())
    full = Admission(flow_active=1)
    first, second = started("run-1", admission=full, concurrency_limit=1), started("run-2", admission=full,
                                                                                      concurrency_limit=1)  # fmt: skip
    assert first.state is not None and second.state is not None
    assert first.state.status == RunStatus.BLOCKED
    live.track(None, first.state)
    live.track(None, second.state)
    assert live.first_blocked(first.state) and not live.first_blocked(second.state)
    assert live.admission("t1", "orders", newcomer=True).queued_ahead == 2  # a newcomer queues behind both
    assert live.next_blocked("t1", "orders") == "run-1"
    live.track(first.state, None)  # canceled meanwhile: the next one gets the slot
    assert live.next_blocked("t1", "orders") == "run-2" and live.first_blocked(second.state)
    live.unblocked(second.state)
    assert live.next_blocked("t1", "orders") is None
