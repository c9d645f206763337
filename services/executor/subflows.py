"""Subflows: a `subflow` step starts its child run by appending the child's trigger, and a child that ends tells its
parent with a `ChildRunFinished` command. Both go through Kafka, never to the other run's state: the child and its
parent may live on different partitions, and so on different workers.
"""

from __future__ import annotations

import uuid
from typing import Any

from schemas import codec
from schemas.events import ChildRunFinished, TriggerInfo, TriggerReceived, TriggerType
from schemas.flows import FlowDefinition
from schemas.status import RunStatus, StepStatus
from schemas.topics import Topics, partition_for
from services.executor.adapters.ledger import LedgerWriter
from services.executor.adapters.steps import runner_input
from services.executor.fold import RunState

_ENDED_OK = frozenset({RunStatus.SUCCEEDED, RunStatus.PARTIAL})


def child_run_id(parent_run_id: str, step: str, attempt: int) -> str:
    """A subflow's child run id: the same for every re-execution of the attempt, so a child starts once."""
    return "run_child_" + uuid.uuid5(uuid.NAMESPACE_URL, f"flowtrail:{parent_run_id}:{step}:{attempt}").hex


def run_output(state: RunState) -> Any:
    """A run's result, as a parent sees it: the output of its last step that succeeded."""
    done = [s for s in state.steps.values() if s.status == StepStatus.SUCCEEDED]
    return done[-1].output if done else None


class Subflows:
    """Appends children's triggers and parents' notices; remembers which children each live run has started."""

    def __init__(self, topics: Topics, partitions: int, ledger: LedgerWriter) -> None:
        self.topics = topics
        self.partitions = partitions
        self.ledger = ledger  # its producer, started with the engine, carries triggers and commands too
        self.sent: dict[str, set[str]] = {}  # by parent run: the child runs whose trigger was sent

    def forget(self, run_id: str) -> None:
        """The run ended here or moved to another worker."""
        self.sent.pop(run_id, None)

    async def start_child(self, state: RunState, flow: FlowDefinition, step_name: str) -> None:
        """Append the child run's trigger (once per attempt: its run id is derived from the attempt)."""
        step = state.steps[step_name]
        child_id = child_run_id(state.run_id, step_name, step.attempt)
        sent = self.sent.setdefault(state.run_id, set())
        if child_id in sent:
            return
        spec = runner_input(state, flow.step(step_name)) or {}
        trigger = TriggerReceived(
            tenant_id=state.tenant_id,
            run_id=child_id,
            flow_id=str(spec.get("flow_id") or ""),
            flow_version=spec.get("version"),
            trigger=TriggerInfo(type=TriggerType.SUBFLOW, caller=state.run_id, payload=spec.get("input")),
            environment=state.environment,  # a TESTING run's children are TESTING runs
            parent_run_id=state.run_id,
            parent_step=step_name,
            parent_attempt=step.attempt,
            trigger_id=f"{child_id}:trigger",
        )
        partition = partition_for(child_id, self.partitions)
        await self.ledger.producer.send_and_wait(
            self.topics.triggers, codec.dumps(trigger), key=child_id.encode(), partition=partition
        )
        sent.add(child_id)

    async def notify_parent(self, child: RunState) -> None:
        """Tell the parent run that this child ended (the parent recognises a repeat by the child's id). A child
        linked by a trigger header (no parent step) tells only a failure its trigger asked to pass on."""
        assert child.parent_run_id is not None
        if child.parent_step is None and not (child.fail_parent_on_failure and child.status not in _ENDED_OK):
            return
        command = ChildRunFinished(
            tenant_id=child.tenant_id,
            run_id=child.parent_run_id,
            issued_by="executor",
            child_run_id=child.run_id,
            step=child.parent_step or "",
            attempt=child.parent_attempt or 1,
            status=child.status.value,
            output=run_output(child),
            error=child.last_error,
        )
        partition = partition_for(child.parent_run_id, self.partitions)
        await self.ledger.producer.send_and_wait(
            self.topics.commands, codec.dumps(command), key=child.parent_run_id.encode(), partition=partition
        )
