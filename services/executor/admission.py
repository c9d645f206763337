"""Admission: the live runs of this worker and what concurrency limits and quotas count over them — active runs per
flow and per tenant, and each flow's BLOCKED runs in arrival order. `decide` admits or blocks a run from these counts
(`decide.Admission`); this module only keeps them in step with every status change.
"""

from __future__ import annotations

from collections import deque

from schemas.status import RunStatus
from services.executor.decide import Admission
from services.executor.fold import RunState
from services.executor.settings import ExecutorSettings

_ACTIVE = (RunStatus.RUNNING, RunStatus.PAUSED)


def is_active(state: RunState | None) -> bool:
    """A run that holds a slot of its flow and tenant."""
    return state is not None and state.status in _ACTIVE


class LiveRuns:
    """The state of every run not yet terminal, and the slot counts and queues derived from them."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.runs: dict[str, RunState] = {}
        self.active_flow: dict[tuple[str, str], int] = {}
        self.active_tenant: dict[str, int] = {}
        self.blocked: dict[tuple[str, str], deque[str]] = {}

    def __contains__(self, run_id: object) -> bool:
        return run_id in self.runs

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, run_id: str) -> RunState | None:
        return self.runs.get(run_id)

    def admission(self, tenant_id: str, flow_id: str, *, newcomer: bool = False) -> Admission:
        """What a run of the flow asking to start is counted against."""
        limit = self.settings.tenant_quotas.get(tenant_id, self.settings.tenant_max_active_runs)
        # A new run queues behind the flow's BLOCKED runs: they are unblocked in arrival order.
        queue = self.blocked.get((tenant_id, flow_id)) if newcomer else None
        ahead = sum(1 for r in queue if r in self.runs) if queue else 0
        return Admission(self.active_flow.get((tenant_id, flow_id), 0), self.active_tenant.get(tenant_id, 0), limit,
                         queued_ahead=ahead)  # fmt: skip

    def track(self, before: RunState | None, after: RunState | None) -> None:
        """Keep the active counts and the blocked queues in step with a run's status change (after None: the run
        is no longer live here)."""
        was, now = is_active(before), is_active(after)
        ref = after or before
        assert ref is not None
        key = (ref.tenant_id, ref.flow_id)
        if was != now:
            delta = 1 if now else -1
            self.active_flow[key] = self.active_flow.get(key, 0) + delta
            self.active_tenant[ref.tenant_id] = self.active_tenant.get(ref.tenant_id, 0) + delta
        newly_blocked = after is not None and after.status == RunStatus.BLOCKED
        if newly_blocked and (before is None or before.status != RunStatus.BLOCKED):
            assert after is not None
            self.blocked.setdefault(key, deque()).append(after.run_id)
        if after is None:
            self.runs.pop(ref.run_id, None)
        else:
            self.runs[ref.run_id] = after

    def first_blocked(self, state: RunState) -> bool:
        """The run is the oldest BLOCKED run of its flow: the only one that may try for a slot."""
        queue = self.blocked.get((state.tenant_id, state.flow_id))
        return queue is not None and len(queue) > 0 and queue[0] == state.run_id

    def unblocked(self, state: RunState) -> None:
        """The head of the flow's queue moved on (started, or ended): the next one may try."""
        self.blocked[(state.tenant_id, state.flow_id)].popleft()

    def next_blocked(self, tenant_id: str, flow_id: str) -> str | None:
        """A slot of the flow was freed: the first BLOCKED run of the flow (arrival order), which asks to start."""
        queue = self.blocked.get((tenant_id, flow_id))
        while queue:
            run_id = queue[0]
            state = self.runs.get(run_id)
            if state is None or state.status != RunStatus.BLOCKED:
                queue.popleft()  # canceled or moved on meanwhile
                continue
            return run_id
        return None
