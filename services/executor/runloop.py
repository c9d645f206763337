"""The run loop: one task per live run carrying out what `next.choose` returns — feed an input to `decide`, sleep
until a time or an input, run a step, start a child run — and nothing it did not choose.

Timers are not stored anywhere but the ledger: a retry's `retry_at`, a scheduled run's `run_at`, a human_input's
`expires_at` and the flow deadline (`RunStarted` + the flow's timeout) are all in the run's events, so a restarted
executor rebuilds them by replaying its partitions and waits again.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.flows import FlowDefinition
from services.executor import decide, metrics
from services.executor import next as next_action
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.steps import StepCall, StepRunners, runner_input
from services.executor.admission import LiveRuns
from services.executor.fold import RunState
from services.executor.settings import ExecutorSettings
from services.executor.subflows import Subflows

log = logging.getLogger(__name__)


class _StepSeconds(dict[tuple[str, str], Any]):
    """metrics.STEP_SECONDS children by (action, outcome), resolved once each (labels() per step costs ~1 us)."""

    def __missing__(self, key: tuple[str, str]) -> Any:
        child = self[key] = metrics.STEP_SECONDS.labels(*key)
        return child


_STEP_SECONDS = _StepSeconds()

# Decide on an input for a run and queue the events (the engine's `feed`); the futures resolve when they are durable.
Feed = Callable[[str, decide.Input], Awaitable[list[asyncio.Future[object]]]]
# A waiting run asks to start: the engine counts it in the shared admission and feeds the input built from the counts.
AskToStart = Callable[[str, Callable[[decide.Admission], decide.Input]], Awaitable[None]]


@dataclass
class RunLoop:
    """Each live run's task, the step it is executing now, and the event that wakes it when an input arrives."""

    settings: ExecutorSettings
    flows: FlowRegistry
    live: LiveRuns
    subflows: Subflows
    runners: StepRunners
    feed: Feed
    ask_to_start: AskToStart
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # The task of a run executing a step now (the run's own loop), so a cancel can abandon the step.
    step_tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    # Set when an input arrives for a run whose loop waits (a timer, a human, a child run).
    wakeups: dict[str, asyncio.Event] = field(default_factory=dict)

    def drive(self, run_id: str) -> None:
        task = asyncio.create_task(self._run_loop(run_id), name=f"run:{run_id}")
        self.tasks[run_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(run_id, None))

    def wake(self, run_id: str) -> None:
        """An input arrived for the run: its waiting loop goes on (or a loop starts, if it has none)."""
        if run_id not in self.live:
            return
        if run_id in self.tasks:
            self.wakeups.setdefault(run_id, asyncio.Event()).set()
        else:
            self.drive(run_id)

    def ended(self, run_id: str) -> None:
        self.wakeups.pop(run_id, None)

    def abandon_step(self, run_id: str) -> None:
        """The run ended (canceled): its step in flight is abandoned; its late result would be ignored anyway."""
        step_task = self.step_tasks.pop(run_id, None)
        if step_task is not None:
            step_task.cancel()

    def stop(self, run_id: str) -> None:
        """The run moved to another worker: its loop and step stop here."""
        task = self.tasks.pop(run_id, None)
        if task:
            task.cancel()
        self.abandon_step(run_id)
        self.wakeups.pop(run_id, None)

    async def close(self) -> None:
        for task in [*self.tasks.values(), *self.step_tasks.values()]:
            task.cancel()
        await asyncio.gather(*self.tasks.values(), *self.step_tasks.values(), return_exceptions=True)

    async def _run_loop(self, run_id: str) -> None:
        try:
            while (state := self.live.get(run_id)) is not None:
                if not await self._next(state):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # An executor bug: recorded with its trace, and the run still ends (invariant 5).
            log.exception("run %s: internal error", run_id)
            metrics.INTERNAL_ERRORS.inc()
            state = self.live.get(run_id)
            if state is not None:
                failure = decide.InternalFailure(run_id, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                                          at_seq=state.next_seq)  # fmt: skip
                await self.feed(run_id, failure)

    async def _wait(self, run_id: str, until: datetime | None) -> None:
        """Until `until`, or until an input for this run arrives (whichever is first)."""
        event = self.wakeups.setdefault(run_id, asyncio.Event())
        timeout = None if until is None else max(0.0, (until - datetime.now(UTC)).total_seconds())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        event.clear()

    async def _next(self, state: RunState) -> bool:
        """Carry out what the run waits for (`next.choose` chooses); False when only a command can drive it on."""
        run_id = state.run_id
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        if flow is None:
            raise LookupError(f"flow {state.flow_id} v{state.flow_version} is not in the registry")
        action = next_action.choose(state, flow, datetime.now(UTC), time_scale=self.settings.time_scale)
        match action:
            case next_action.Deadline():
                await self.feed(run_id, decide.DeadlinePassed(run_id))
            case next_action.ScheduledDue():
                await self.ask_to_start(run_id, lambda admission: decide.ScheduledDue(run_id, admission))
            case next_action.TryUnblock():
                await self._try_unblock(state)
            case next_action.ExpirePause(request_id):
                await self.feed(run_id, decide.PauseExpired(run_id, request_id))
            case next_action.FireTimer(name, attempt):
                await self.feed(run_id, decide.TimerFired(run_id, name, attempt))
            case next_action.Wait(until):
                await self._wait(run_id, until)
            case next_action.StartChild(name, until):
                await self.subflows.start_child(state, flow, name)
                if until is None:
                    return False  # the child's end (a command) drives the run again
                await self._wait(run_id, until)
            case next_action.RunStep(name, until):
                await self._run_step(state, flow, name, until)
            case next_action.Idle():
                return False
        return True

    async def _try_unblock(self, state: RunState) -> None:
        """Ask for a slot; if there is still no room, wait until woken (a slot of the flow was freed)."""
        run_id, before = state.run_id, state.next_seq
        await self.ask_to_start(run_id, lambda admission: decide.SlotFreed(run_id, admission, at_seq=before))
        after = self.live.get(run_id)
        if after is not None and after.next_seq == before:
            await self._wait(run_id, None)

    async def _run_step(self, state: RunState, flow: FlowDefinition, name: str, deadline: datetime | None) -> None:
        """Run the step's runner, abandoning it when the flow deadline passes, and feed its outcome to decide."""
        run_id = state.run_id
        step = state.steps[name]
        definition = flow.step(name)
        now = datetime.now(UTC)
        call = StepCall(
            run_id=run_id,
            step=name,
            action=definition.action.value,
            attempt=step.attempt,
            input=runner_input(state, definition),
            started_at=step.started_at or now,
            timeout_s=definition.timeout_s or self.settings.default_step_timeout_s,
            tenant_id=state.tenant_id,
            environment=state.environment.value,
        )
        # The runner is awaited in the run's own task, not in a task of its own watched by asyncio.wait (about 11 us
        # a step): a cancel abandons the step by cancelling this task (the run has ended, so its loop ends with it),
        # the flow deadline by the timeout.
        task = asyncio.current_task()
        assert task is not None
        self.step_tasks[run_id] = task
        try:
            if deadline is None:  # only a cancel can abandon the step
                outcome = await self.runners.run(call)
            else:
                async with asyncio.timeout(max(0.0, (deadline - now).total_seconds())) as limit:
                    outcome = await self.runners.run(call)
        except TimeoutError:
            if deadline is not None and limit.expired():
                return  # the flow deadline passed mid-step: abandoned
            raise
        finally:
            if self.step_tasks.get(run_id) is task:
                del self.step_tasks[run_id]
        _STEP_SECONDS[call.action, "ok" if outcome.ok else "error"].observe(outcome.duration_ms / 1000)
        await self.feed(run_id, decide.StepCompleted(
            run_id, name, step.attempt, outcome.ok, outcome.output, outcome.error, outcome.duration_ms
        ))  # fmt: skip
