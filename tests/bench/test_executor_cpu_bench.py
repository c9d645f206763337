"""The executor's CPU per run in decide, fold and encode: its shortcuts beside the plain library calls, in one process.

The same runs of no-op steps are decided, folded and encoded as the engine does it (`decide_and_fold` per input, each
event encoded by the ledger writer's `encode_event`), in alternating rounds: the current code, and a reference path
that builds every event through its validating constructor (emitter.build_event skips that), copies the fold's states
with `dataclasses.replace` (fold._replacer's generated copies skip that) and encodes with `codec.dumps` (a JSON-mode
dump then orjson). Both must write the same bytes; the figure is the reference's CPU over the current's (a ratio
from the same process, so another process's load shifts both alike), never an absolute time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import codec
from schemas.events import EventBase, TriggerInfo, TriggerReceived, TriggerType
from schemas.flows import FlowDefinition
from services.executor import fold
from services.executor.adapters.ledger import encode_event
from services.executor.decide import Clock, StartRun, StepCompleted, decide_and_fold, emitter
from tests.bench.load import TENANT, noop_flow
from tests.bench.report import Report
from tests.bench.scale import Scale

ROUNDS = 5
T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)


def _runs(flow: FlowDefinition, runs: int, encode: Callable[[EventBase], bytes]) -> list[bytes]:
    """Every record of `runs` runs of `flow`, each step succeeding, as the ledger writer would send them."""
    records: list[bytes] = []
    for i in range(runs):
        trigger = TriggerReceived(
            trigger_id=f"trg-{i}", tenant_id=TENANT, run_id=f"run_{i:024x}", flow_id=flow.id,
            trigger=TriggerInfo(type=TriggerType.API, caller="key", payload={"i": i}), received_at=T0,
        )  # fmt: skip
        events, state = decide_and_fold(None, flow, StartRun(trigger, flow.version), Clock(now=T0))
        records += map(encode, events)
        for n, step in enumerate(flow.steps):
            assert state is not None
            done = StepCompleted(state.run_id, step.name, 1, True, {"n": n}, None, 0.5)
            events, state = decide_and_fold(state, flow, done, Clock(now=T0 + timedelta(milliseconds=n + 1)))
            records += map(encode, events)
        assert state is not None and state.terminal
    return records


def _validated(cls: type[EventBase], payload: Any, **fields: Any) -> EventBase:
    return cls(payload=payload, **fields)


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    return dataclasses.replace(obj, **changes)


def _reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emitter, "build_event", _validated)
    monkeypatch.setattr(fold, "_replace_run", _replace)
    monkeypatch.setattr(fold, "_replace_step", _replace)


def _cpu_per_run(flow: FlowDefinition, runs: int, encode: Callable[[EventBase], bytes]) -> float:
    began = time.process_time()
    _runs(flow, runs, encode)
    return (time.process_time() - began) / runs


def test_executor_decide_fold_encode_cpu(scale: Scale, report: Report, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = noop_flow("cpu", scale.steps)
    runs = max(50, scale.e2e_runs // 4)
    current = _runs(flow, 3, encode_event)
    _reference(monkeypatch)
    reference = _runs(flow, 3, codec.dumps)
    monkeypatch.undo()
    assert current == reference  # the shortcuts change no byte the ledger holds
    assert len(current) == 3 * (4 + 2 * scale.steps)  # requested, queued, started, each step twice, succeeded

    ref_cpu, cur_cpu = [], []
    for _ in range(ROUNDS):
        _reference(monkeypatch)
        ref_cpu.append(_cpu_per_run(flow, runs, codec.dumps))
        monkeypatch.undo()
        cur_cpu.append(_cpu_per_run(flow, runs, encode_event))
    ratio = statistics.median(ref_cpu) / statistics.median(cur_cpu)
    rounds = ", ".join(f"{r / c:.2f}" for r, c in zip(ref_cpu, cur_cpu, strict=True))
    print(f"\ndecide + fold + encode of a {scale.steps}-step run: reference / current CPU {ratio:.2f}x "
          f"(median of {ROUNDS} alternating rounds of {runs} runs; per round {rounds})")  # fmt: skip
    report.add("cpu", f"executor decide + fold + encode of a {scale.steps}-step run, reference path / current", ratio,
               "x", note=f"median of {ROUNDS} alternating rounds of {runs} runs in one process")  # fmt: skip
    report.details["executor_cpu_bench"] = {"runs": runs, "reference_s_per_run": ref_cpu, "current_s_per_run": cur_cpu}
