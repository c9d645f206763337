"""The engine's pure parts: a partition's replay scan (services/executor/replay.py) and admission
(services/executor/admission.py: the live runs, when a limit applies, and the counts that make `decide` record the
shared admission's answer), fed states and records the real `decide` produced."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from schemas import codec
from schemas.status import RunStatus
from services.executor.adapters.slots import SharedSlots, SlotAnswer
from services.executor.admission import Admitter, LiveRuns, _counts
from services.executor.decide import Admission, SlotFreed, StartRun
from services.executor.finished import FinishedRuns
from services.executor.fold import fold_all
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


def test_live_runs_keep_each_run_until_it_is_no_longer_live_here() -> None:
    live = LiveRuns()
    a, b = started("run-a"), started("run-b", admission=Admission(flow_active=1), concurrency_limit=1)
    assert a.state is not None and b.state is not None
    live.track(None, a.state)
    live.track(None, b.state)
    assert len(live) == 2 and live.blocked() == ["run-b"]
    live.track(a.state, None)
    assert "run-a" not in live and live.get("run-b") is b.state and len(live) == 1


def test_a_limit_applies_to_a_flow_with_a_concurrency_limit_or_a_tenant_with_a_quota() -> None:
    admitter = Admitter(ExecutorSettings(tenant_max_active_runs=5, tenant_quotas={"t1": 2}), SharedSlots("", "x"))
    assert admitter.tenant_limit("t1") == 2 and admitter.tenant_limit("t2") == 5  # the tenant's own quota first
    plain = Admitter(ExecutorSettings(), SharedSlots("", "x"))
    assert not plain.limited("t1", make_flow(*TWO)) and plain.limited("t1", make_flow(*TWO, concurrency_limit=3))
    assert plain.limited("t1", None) is False and admitter.limited("t1", make_flow(*TWO))


ANSWERS = {
    "granted": (SlotAnswer("granted", 1, 1, 0), "RunStarted"),
    "granted again after a crash": (SlotAnswer("granted", 2, 2, 0), "RunStarted"),
    "blocked by active runs": (SlotAnswer("blocked", 2, 2, 0), "RunBlocked"),
    "blocked behind earlier arrivals": (SlotAnswer("blocked", 1, 1, 1), "RunBlocked"),
    "refused by the quota": (SlotAnswer("refused", 1, 3, 0), "RunQuotaExceeded"),
}


@pytest.mark.parametrize("case", ANSWERS)
def test_decide_records_exactly_the_shared_admissions_answer(case: str) -> None:
    """The counts given to `decide` make it record what every executor agreed on, for a new run and for a BLOCKED
    run asking again (limit 2, quota 3)."""
    answer, recorded = ANSWERS[case]
    counts = _counts(answer, 3)
    newcomer = started("run-new", admission=counts, concurrency_limit=2)
    assert newcomer.types[2] == recorded, newcomer.types

    waiting = started("run-waiting", admission=Admission(flow_active=2), concurrency_limit=2)
    assert waiting.state is not None and waiting.state.status == RunStatus.BLOCKED
    before = len(waiting.ledger)
    waiting.feed(SlotFreed("run-waiting", counts, at_seq=waiting.state.next_seq))
    asked_again = [e.type for e in waiting.ledger[before:]]
    if answer.outcome == "blocked":
        assert asked_again == []  # still no room: nothing recorded, it waits to be woken
    else:
        assert asked_again[:2] == ["RunQueued", recorded]


def test_a_queued_run_whose_start_was_lost_asks_and_starts_once() -> None:
    """RunQueued recorded, RunStarted lost to a crash: the run asks for the first time and starts."""
    run = started("run-q", admission=Admission(), concurrency_limit=2)
    queued = fold_all(run.ledger[:2])
    assert queued is not None and queued.status == RunStatus.QUEUED
    run.state, run.ledger = queued, run.ledger[:2]
    run.feed(SlotFreed("run-q", Admission(), at_seq=queued.next_seq))
    assert [e.type for e in run.ledger[2:4]] == ["RunStarted", "StepStarted"]
    assert [e.seq for e in run.ledger] == list(range(len(run.ledger)))
