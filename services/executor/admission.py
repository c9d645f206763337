"""Admission: the live runs of this worker, and what a run asking to start is counted against — the active runs of
its flow (a flow's `concurrency_limit`) and of its tenant (the tenant's quota) over every executor, in the shared
admission (`adapters/slots.py`, docs/architecture.md "Admission"). `decide` admits, blocks or refuses a run from the
counts it is given (`decide.Admission`); this module turns the shared admission's answer into those counts, so the
decision recorded in the ledger is the one every executor agreed on.
"""

from __future__ import annotations

from schemas.flows import FlowDefinition
from schemas.status import RunStatus
from services.executor.adapters.slots import Holder, SharedSlots, SlotAnswer
from services.executor.decide import Admission
from services.executor.fold import RunState
from services.executor.settings import ExecutorSettings

_ACTIVE = (RunStatus.RUNNING, RunStatus.PAUSED)


def is_active(state: RunState | None) -> bool:
    """A run that holds a slot of its flow and tenant."""
    return state is not None and state.status in _ACTIVE


def holds_or_waits(state: RunState | None) -> bool:
    """A run with a row in the shared admission: holding a slot, or BLOCKED waiting for one."""
    return state is not None and (state.status in _ACTIVE or state.status == RunStatus.BLOCKED)


class LiveRuns:
    """The state of every run not yet terminal."""

    def __init__(self) -> None:
        self.runs: dict[str, RunState] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self.runs

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, run_id: str) -> RunState | None:
        return self.runs.get(run_id)

    def track(self, before: RunState | None, after: RunState | None) -> None:
        """The run's state after a decision (None: the run is no longer live here)."""
        if after is None:
            assert before is not None
            self.runs.pop(before.run_id, None)
        else:
            self.runs[after.run_id] = after

    def blocked(self) -> list[str]:
        return [run_id for run_id, state in self.runs.items() if state.status == RunStatus.BLOCKED]


def _counts(answer: SlotAnswer, tenant_limit: int | None) -> Admission:
    """The counts that make `decide` record the shared admission's answer (its checks run in the same order)."""
    if answer.outcome == "granted":
        return Admission(tenant_limit=tenant_limit)
    if answer.outcome == "blocked":  # flow_active + queued_ahead reached the limit: decide sees the flow full
        return Admission(answer.flow_active, 0, tenant_limit, answer.queued_ahead)
    return Admission(answer.flow_active, answer.tenant_active, tenant_limit)  # refused: the tenant is at its quota


class Admitter:
    """Asks the shared admission for the runs a limit applies to; every other run starts without asking."""

    def __init__(self, settings: ExecutorSettings, slots: SharedSlots) -> None:
        self.settings = settings
        self.slots = slots
        # Runs whose admission is being asked now, until their decision is tracked.
        self.asking: set[str] = set()
        # Quotas the operator API stored with each tenant (`tenants.max_active_runs`), refreshed by the engine.
        self.stored: dict[str, int] = {}

    def tenant_limit(self, tenant_id: str) -> int | None:
        """The tenant's quota: the one stored with it (operator API), else FLOWTRAIL_EXECUTOR_TENANT_QUOTAS, else
        FLOWTRAIL_EXECUTOR_TENANT_MAX_ACTIVE_RUNS (None: no quota)."""
        stored = self.stored.get(tenant_id)
        if stored is not None:
            return stored
        return self.settings.tenant_quotas.get(tenant_id, self.settings.tenant_max_active_runs)

    def limited(self, tenant_id: str, flow: FlowDefinition | None) -> bool:
        """A limit applies to the flow's runs: its concurrency limit, or the tenant's quota."""
        return (flow is not None and flow.concurrency_limit is not None) or self.tenant_limit(tenant_id) is not None

    async def ask(self, run_id: str, tenant_id: str, flow: FlowDefinition, partition: int, *,
                  waiting: bool) -> Admission:  # fmt: skip
        """The counts for `decide`: the shared admission's answer when a limit applies, else room to start. The
        caller discards `run_id` from `asking` once the decision is tracked."""
        tenant_limit = self.tenant_limit(tenant_id)
        if flow.concurrency_limit is None and tenant_limit is None:
            return Admission()
        self.asking.add(run_id)
        answer = await self.slots.admit(run_id, tenant_id, flow.id, partition, flow_limit=flow.concurrency_limit,
                                        tenant_limit=tenant_limit, waiting=waiting)  # fmt: skip
        return _counts(answer, tenant_limit)

    def holders(self, states: list[RunState], flows: dict[tuple[str, str, int], FlowDefinition | None]) -> list[Holder]:
        """The active runs among `states` that a limit applies to (`flows`: each run's flow version)."""
        return [
            Holder(s.run_id, s.tenant_id, s.flow_id)
            for s in states
            if is_active(s) and self.limited(s.tenant_id, flows.get((s.tenant_id, s.flow_id, s.flow_version)))
        ]
