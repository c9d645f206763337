"""Retries you can chain, decided by the pure parts end to end: the executor's decide/fold, the projector's fold
into run_steps rows, and the API's choice of the steps a FROM_FAILED_STEP retry reuses (services.api.retry)."""

from __future__ import annotations

from typing import Any

from schemas.events import RetryStrategy, ReusedStep
from services.api.retry import plan_reuse
from services.common.runfold.rows import plan
from services.executor.decide import Admission, StartRun
from tests.unit.drive import Run, error, make_flow, make_trigger

FLOW = make_flow(
    {"name": "login", "extract": {"user_id": "body.id"}},
    {"name": "fetch", "input": {"url": "http://up/users/{{ vars.user_id }}"}},
    {"name": "push", "input": {"user": "{{ vars.user_id }}", "fetched": "{{ steps.fetch.output.n }}"}},
    {"name": "confirm"},
)
OUTPUTS = {"login": {"body": {"id": 42}}, "fetch": {"n": 7}, "push": {"ok": True}, "confirm": {"done": True}}


def _rows(run: Run) -> list[dict[str, Any]]:
    """The run's run_steps rows as the projector folds them from the run's ledger, by position."""
    changes = [c for c in plan(run.ledger).step_changes.values() if c.run_id == run.trigger.run_id]
    return [vars(c) for c in sorted(changes, key=lambda c: c.position)]


def _retry(of: Run, run_id: str) -> Run:
    reuse = plan_reuse(of.trigger.run_id, _rows(of))
    trigger = make_trigger(run_id, retry_of=of.trigger.run_id, retry_strategy=RetryStrategy.FROM_FAILED_STEP,
                           reuse=reuse.outputs, reused=reuse.steps)  # fmt: skip
    run = Run(FLOW, trigger)
    run.feed(StartRun(trigger, FLOW.version, Admission()))
    return run


def _run_until(run: Run, fail_at: str | None) -> None:
    """Complete the steps the run starts, each with its output, failing `fail_at` (not retried)."""
    while (active := run.active()) is not None:
        name = active[0]
        if name == fail_at:
            run.complete(ok=False, err=error("VALIDATION", f"{name} refused"))
        else:
            run.complete(output=OUTPUTS[name])


def _started(run: Run) -> list[str]:
    return [e.payload.step for e in run.of_type("StepStarted")]


def test_a_retry_of_a_retry_of_a_retry_runs_again_nothing_that_succeeded_in_the_chain() -> None:
    gen1 = Run(FLOW, make_trigger("run-1"))
    gen1.start()
    _run_until(gen1, fail_at="fetch")
    assert _started(gen1) == ["login", "fetch"] and gen1.types[-1] == "RunFailed"

    gen2 = _retry(gen1, "run-2")
    _run_until(gen2, fail_at="push")
    assert _started(gen2) == ["fetch", "push"]
    # The extraction came with the reused step: the retry renders {{ vars.user_id }}.
    assert gen2.of_type("StepStarted")[0].payload.input == {"url": "http://up/users/42"}

    gen3 = _retry(gen2, "run-3")
    _run_until(gen3, fail_at="confirm")
    assert _started(gen3) == ["push", "confirm"]
    assert gen3.of_type("StepStarted")[0].payload.input == {"user": 42, "fetched": 7}

    gen4 = _retry(gen3, "run-4")
    _run_until(gen4, fail_at=None)
    assert _started(gen4) == ["confirm"] and gen4.types[-1] == "RunSucceeded"

    # Across the chain each step ran exactly once where it succeeded.
    ran_ok = [e.payload.step for g in (gen1, gen2, gen3, gen4) for e in g.of_type("StepSucceeded")
              if e.payload.reused_from is None]  # fmt: skip
    assert sorted(ran_ok) == sorted(OUTPUTS)

    # The reused steps keep their flow position, action, input and extractions, and name the run where they ran.
    rows = _rows(gen4)
    assert [r["step"] for r in rows] == ["login", "fetch", "push", "confirm"]
    assert [r["position"] for r in rows] == [0, 1, 2, 3]
    assert [r["reused_from"] for r in rows] == ["run-1", "run-2", "run-3", None]
    assert all(r["action"] == "transform" and r["status"] == "SUCCEEDED" for r in rows)
    assert rows[0]["extractions"] == {"user_id": 42}
    assert rows[1]["input"] == {"url": "http://up/users/42"}
    assert rows[2]["input"] == {"user": 42, "fetched": 7}
    assert gen4.state is not None and gen4.state.vars == {"user_id": 42}


def test_a_retry_requested_before_extractions_were_carried_computes_them_from_the_reused_output() -> None:
    trigger = make_trigger("run-2", retry_of="run-1", retry_strategy=RetryStrategy.FROM_FAILED_STEP,
                           reuse={"login": OUTPUTS["login"]})  # fmt: skip
    run = Run(FLOW, trigger)
    run.feed(StartRun(trigger, FLOW.version, Admission()))
    reused = run.of_type("StepSucceeded")[0].payload
    assert (reused.reused_from, reused.position, reused.action, reused.extractions) == (
        "run-1", 0, "transform", {"user_id": 42})  # fmt: skip
    assert run.of_type("StepStarted")[0].payload.input == {"url": "http://up/users/42"}


def test_reuse_takes_every_succeeded_step_wherever_it_sorts_and_reruns_steps_with_failed_records() -> None:
    rows = [
        # A step reused before reused steps carried a position sorts after the failed step: reused all the same.
        {"step": "login", "position": 1_000_003, "status": "SUCCEEDED", "input": None, "output": {"a": 1},
         "extractions": None, "reused_from": "run-0"},
        {"step": "sync", "position": 1, "status": "SUCCEEDED", "input": {"x": 1}, "output": {"b": 2},
         "extractions": {}, "reused_from": None},
        {"step": "fetch", "position": 2, "status": "FAILED", "input": {}, "output": None, "extractions": None,
         "reused_from": None},
    ]  # fmt: skip
    reuse = plan_reuse("run-1", rows, rerun={"sync"})
    assert reuse.outputs == {"login": {"a": 1}}
    assert reuse.steps == {"login": ReusedStep(run_id="run-0", input=None, extractions={})}
