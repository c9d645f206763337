"""An executor bug (an exception outside any step runner's own error handling) ends the run INTERNAL_ERROR with
its trace, on the real broker: the run still ends (invariant 5) and the engine goes on with other runs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from schemas.events import TriggerInfo, TriggerReceived, new_run_id
from schemas.topics import partition_for
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter, read_partition
from services.executor.adapters.steps import StepCall, StepOutcome
from services.executor.engine import Engine
from services.executor.settings import ExecutorSettings
from tests.conftest import Infra, make_sandbox
from tests.harness import flow, publish_flows


def _trigger(flow_id: str, payload: Any) -> TriggerReceived:
    return TriggerReceived(tenant_id="t1", run_id=new_run_id(), flow_id=flow_id,
                           trigger=TriggerInfo(type="api", payload=payload))  # fmt: skip


async def test_an_executor_bug_ends_the_run_internal_error_with_its_trace_and_others_go_on(infra: Infra) -> None:
    async with make_sandbox(infra) as sandbox:
        await publish_flows(sandbox, [flow("t1", "f1", [
            {"name": "prepare", "action": "transform", "input": {"output": {"ok": True}}},
            {"name": "explode", "action": "transform", "input": {"output": {"boom": "{{ trigger.boom }}"}}},
        ], name="F")])  # fmt: skip
        settings = ExecutorSettings(kafka_bootstrap=infra.kafka_bootstrap, topic_prefix=sandbox.topics.prefix,
                                    partitions=sandbox.partitions, state_dir=infra.state_dir)  # fmt: skip
        engine = Engine(settings, LedgerWriter(infra.kafka_bootstrap, sandbox.topics.ledger, linger_ms=1),
                        FlowRegistry(infra.kafka_bootstrap, sandbox.topics.flows))  # fmt: skip
        real_run = engine.runners.run

        async def buggy(call: StepCall) -> StepOutcome:
            # A bug in the engine's own code path, not a failing step: runners turn step errors into outcomes.
            if call.step == "explode" and call.input["output"]["boom"]:
                raise KeyError("steps")
            return await real_run(call)

        engine.runners.run = buggy  # type: ignore[method-assign]
        try:
            await engine.assign(range(sandbox.partitions))
            bad, good = _trigger("f1", {"boom": True}), _trigger("f1", {"boom": False})
            await engine.on_triggers([(partition_for(t.run_id, sandbox.partitions), t) for t in (bad, good)])
            deadline = time.monotonic() + 20
            while not (bad.run_id in engine.finished and good.run_id in engine.finished):
                assert time.monotonic() < deadline, engine.runs
                await asyncio.sleep(0.02)
            await engine.ledger.flush()
        finally:
            await engine.close()
            await engine.flows.stop()
            await engine.ledger.stop()

        events = await read_partition(infra.kafka_bootstrap, sandbox.topics.ledger,
                                      partition_for(bad.run_id, sandbox.partitions))  # fmt: skip
        run = [e for e in events if e.run_id == bad.run_id]
        assert [e.seq for e in run] == list(range(len(run)))
        assert [e.type for e in run][-2:] == ["StepCanceled", "RunInternalError"]
        error = run[-1].payload.error
        assert error.category == "INTERNAL" and error.message == "KeyError: 'steps'"
        assert "Traceback" in error.details["trace"] and "buggy" in error.details["trace"]
        other = await read_partition(infra.kafka_bootstrap, sandbox.topics.ledger,
                                     partition_for(good.run_id, sandbox.partitions))  # fmt: skip
        assert [e.type for e in other if e.run_id == good.run_id][-1] == "RunSucceeded"
