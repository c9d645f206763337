"""The run engine: owns the runs of its partitions, feeds inputs to `decide`, appends, runs steps."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from schemas.events import EventBase, TriggerReceived
from schemas.status import StepStatus
from services.executor import metrics
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter, read_partition
from services.executor.adapters.steps import StepCall, StepRunners, runner_input
from services.executor.decide import (
    Clock,
    Input,
    InternalFailure,
    StartRun,
    StepCompleted,
    TimerFired,
    decide_and_fold,
)
from services.executor.fold import RunState, fold
from services.executor.settings import ExecutorSettings

log = logging.getLogger(__name__)


class _EventCounters(dict[str, Any]):
    """metrics.EVENTS children by event type, resolved once each (labels() per event costs ~6 µs)."""

    def __missing__(self, event_type: str) -> Any:
        child = self[event_type] = metrics.EVENTS.labels(event_type)
        return child


_EVENT_COUNTERS = _EventCounters()


class Engine:
    def __init__(self, settings: ExecutorSettings, ledger: LedgerWriter, flows: FlowRegistry) -> None:
        self.settings = settings
        self.ledger = ledger
        self.flows = flows
        self.runners = StepRunners.from_settings(settings)
        self.runs: dict[str, RunState] = {}  # runs not yet terminal
        self.finished: set[str] = set()  # terminal runs: a redelivered trigger for one is ignored
        self.partition_of: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.owned: set[int] = set()
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        """Idempotent: faust may signal a rebalance before its own services have started."""
        async with self._start_lock:
            if not self._started:
                await self.ledger.start()
                await self.flows.start()
                self._started = True

    def clock(self) -> Clock:
        return Clock(now=datetime.now(UTC), time_scale=self.settings.time_scale)

    # ------------------------------------------------------------------ partitions

    async def assign(self, partitions: Iterable[int]) -> None:
        """Rebuild the state of a partition's runs from the ledger, then resume the unfinished ones."""
        await self.start()
        for partition in sorted(set(partitions) - self.owned):
            events = await read_partition(self.settings.kafka_bootstrap, self.ledger.topic, partition)
            metrics.REPLAY_EVENTS.inc(len(events))
            states: dict[str, RunState] = {}
            for event in events:
                if event.run_id in self.finished:
                    continue
                try:
                    states[event.run_id] = fold(states.get(event.run_id), event)
                except ValueError as exc:
                    log.error("cannot fold %s seq %s: %s", event.run_id, event.seq, exc)
            for run_id, state in states.items():
                live = self.runs.get(run_id)
                if live is not None and live.next_seq >= state.next_seq:
                    # Started by a trigger handled while this partition was being replayed: the live state is
                    # newer than the ledger read, and deciding from the older one would reuse its seqs.
                    continue
                if state.terminal:
                    self.finished.add(run_id)
                else:
                    self.runs[run_id] = state
                    self.partition_of[run_id] = partition
            self.owned.add(partition)
            # A run that a trigger started during the replay is driven already: a second task would run its steps twice.
            resumed = [
                r for r, p in self.partition_of.items() if p == partition and r in self.runs and r not in self.tasks
            ]
            for run_id in resumed:
                self._drive(run_id)
            log.info("partition %s: %s events replayed, %s runs resumed", partition, len(events), len(resumed))
        metrics.ACTIVE_RUNS.set(len(self.runs))

    async def revoke(self, partitions: Iterable[int]) -> None:
        await self.start()
        gone = set(partitions)
        for run_id in [r for r, p in self.partition_of.items() if p in gone]:
            task = self.tasks.pop(run_id, None)
            if task:
                task.cancel()
            self.runs.pop(run_id, None)
            self.partition_of.pop(run_id, None)
        self.owned -= gone
        await self.ledger.producer.flush()

    # ------------------------------------------------------------------ inputs

    async def on_triggers(self, triggers: list[tuple[int, TriggerReceived]]) -> None:
        """Start a run per new trigger; returns once their first events are durable in the ledger."""
        pending: list[asyncio.Future[object]] = []
        for partition, trigger in triggers:
            if trigger.run_id in self.finished or trigger.run_id in self.runs:
                metrics.TRIGGERS.labels("duplicate").inc()
                if trigger.run_id in self.runs and trigger.run_id not in self.tasks:
                    self._drive(trigger.run_id)
                continue
            flow = self.flows.get(trigger.tenant_id, trigger.flow_id, trigger.flow_version)
            if flow is None:
                await self.flows.catch_up()
                flow = self.flows.get(trigger.tenant_id, trigger.flow_id, trigger.flow_version)
            version = flow.version if flow else (trigger.flow_version or 0)
            self.partition_of[trigger.run_id] = partition
            pending += await self._apply(*decide_and_fold(None, flow, StartRun(trigger, version), self.clock()))
            metrics.TRIGGERS.labels("started" if flow else "invalid").inc()
            if trigger.run_id in self.runs:
                self._drive(trigger.run_id)
        if pending:
            await asyncio.gather(*pending)

    async def _apply(self, events: list[EventBase], state: RunState | None) -> list[asyncio.Future[object]]:
        """`state` is the run after `events` (decide_and_fold folded them as it decided)."""
        if not events:
            return []
        run_id = events[0].run_id
        for event in events:
            _EVENT_COUNTERS[event.type].inc()
        assert state is not None
        if state.terminal:
            self.runs.pop(run_id, None)
            self.finished.add(run_id)
        else:
            self.runs[run_id] = state
        metrics.ACTIVE_RUNS.set(len(self.runs))
        # Appending failures crash the worker (faust restarts from the ledger): state here must never
        # run ahead of a ledger that did not take the events.
        return await self.ledger.append(self.partition_of[run_id], events)

    async def feed(self, run_id: str, inp: Input) -> None:
        state = self.runs.get(run_id)
        if state is None:
            return
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        await self._apply(*decide_and_fold(state, flow, inp, self.clock()))

    # ------------------------------------------------------------------ driving a run

    def _drive(self, run_id: str) -> None:
        task = asyncio.create_task(self._run_loop(run_id), name=f"run:{run_id}")
        self.tasks[run_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(run_id, None))

    async def _run_loop(self, run_id: str) -> None:
        try:
            while (state := self.runs.get(run_id)) is not None:
                if not await self._next(state):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # An executor bug: recorded with its trace, and the run still ends (DESIGN 2.5).
            log.exception("run %s: internal error", run_id)
            metrics.INTERNAL_ERRORS.inc()
            state = self.runs.get(run_id)
            if state is not None:
                failure = InternalFailure(run_id, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                                          at_seq=state.next_seq)  # fmt: skip
                await self.feed(run_id, failure)

    async def _next(self, state: RunState) -> bool:
        """Do what the run waits for; False when it waits for nothing this engine can do."""
        active = [(n, s) for n, s in state.steps.items() if s.status in (StepStatus.RUNNING, StepStatus.RETRYING)]
        if not active:
            return False
        name, step = active[0]
        if step.status == StepStatus.RETRYING:
            due = step.retry_at.timestamp() if step.retry_at else 0
            await asyncio.sleep(max(0.0, due - datetime.now(UTC).timestamp()))
            await self.feed(state.run_id, TimerFired(state.run_id, name, step.attempt))
            return True
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        if flow is None:
            raise LookupError(f"flow {state.flow_id} v{state.flow_version} is not in the registry")
        definition = flow.step(name)
        call = StepCall(
            run_id=state.run_id,
            step=name,
            action=definition.action.value,
            attempt=step.attempt,
            input=runner_input(state, definition),
            started_at=step.started_at or datetime.now(UTC),
            timeout_s=definition.timeout_s or self.settings.default_step_timeout_s,
        )
        outcome = await self.runners.run(call)
        metrics.STEP_SECONDS.labels(call.action, "ok" if outcome.ok else "error").observe(outcome.duration_ms / 1000)
        await self.feed(state.run_id, StepCompleted(
            state.run_id, name, step.attempt, outcome.ok, outcome.output, outcome.error, outcome.duration_ms
        ))  # fmt: skip
        return True

    async def close(self) -> None:
        if self._started:
            await self.ledger.producer.flush()
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.runners.close()
