"""The run engine: owns the runs of its partitions, feeds inputs to `decide`, appends, runs steps.

Timers are not stored anywhere but the ledger: a retry's `retry_at`, a scheduled run's `run_at`, a
human_input's `expires_at` and the flow deadline (`RunStarted` + the flow's timeout) are all in the
run's events, so a restarted executor rebuilds them by replaying its partitions and waits again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from schemas import codec
from schemas.events import (
    TERMINAL_EVENT_STATUS,
    ArchiveRun,
    CancelRun,
    ChildRunFinished,
    CommandBase,
    EventBase,
    ResumeRun,
    TriggerInfo,
    TriggerReceived,
    TriggerType,
)
from schemas.flows import FlowDefinition
from schemas.status import RunStatus, StepStatus
from schemas.topics import Topics, partition_for
from services.executor import metrics
from services.executor import next as next_action
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter, iter_partition_raw
from services.executor.adapters.steps import StepCall, StepRunners, runner_input
from services.executor.decide import (
    Admission,
    Clock,
    CommandInput,
    DeadlinePassed,
    Input,
    InternalFailure,
    PauseExpired,
    ScheduledDue,
    SlotFreed,
    StartRun,
    StepCompleted,
    TimerFired,
    archive,
    decide_and_fold,
)
from services.executor.finished import FinishedRuns
from services.executor.fold import RunState, fold
from services.executor.settings import ExecutorSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
# A child run that ended within this long before a replay tells its parent again (it may have crashed first).
CHILD_RENOTIFY_WINDOW = timedelta(hours=24)

_ACTIVE = (RunStatus.RUNNING, RunStatus.PAUSED)


class _EventCounters(dict[str, Any]):
    """metrics.EVENTS children by event type, resolved once each (labels() per event costs ~6 µs)."""

    def __missing__(self, event_type: str) -> Any:
        child = self[event_type] = metrics.EVENTS.labels(event_type)
        return child


_EVENT_COUNTERS = _EventCounters()


def child_run_id(parent_run_id: str, step: str, attempt: int) -> str:
    """A subflow's child run id: the same for every re-execution of the attempt, so a child starts once."""
    return "run_child_" + uuid.uuid5(uuid.NAMESPACE_URL, f"flowtrail:{parent_run_id}:{step}:{attempt}").hex


def _fold_raw(raw: list[dict[str, Any]]) -> RunState | None:
    """A run's state from its raw ledger records; an undecodable record is skipped (the projector dead-letters it)."""
    state: RunState | None = None
    for obj in raw:
        try:
            state = fold(state, codec.ledger_event_from_dict(obj))
        except (codec.DecodeError, ValueError) as exc:
            log.error("run %s seq %s not replayed: %s", obj.get("run_id"), obj.get("seq"), exc)
    return state


def run_output(state: RunState) -> Any:
    """A run's result, as a parent sees it: the output of its last step that succeeded."""
    done = [s for s in state.steps.values() if s.status == StepStatus.SUCCEEDED]
    return done[-1].output if done else None


class Engine:
    def __init__(self, settings: ExecutorSettings, ledger: LedgerWriter, flows: FlowRegistry) -> None:
        self.settings = settings
        self.ledger = ledger
        self.flows = flows
        self.topics = Topics(settings.topic_prefix)
        self.runners = StepRunners.from_settings(settings)
        self.runs: dict[str, RunState] = {}  # runs not yet terminal
        # Terminal runs and their next seq: a redelivered trigger for one is ignored, an archive appends at that seq.
        self.finished = FinishedRuns()
        self.archived: set[str] = set()
        self.partition_of: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # The step a run is executing now, so a cancel or the flow deadline can abandon it.
        self.step_tasks: dict[str, asyncio.Task[Any]] = {}
        # Set when an input arrives for a run whose loop waits (a timer, a human, a child run).
        self.wakeups: dict[str, asyncio.Event] = {}
        # Admission: active runs per flow and per tenant, and the BLOCKED runs of each flow in arrival order.
        self.active_flow: dict[tuple[str, str], int] = {}
        self.active_tenant: dict[str, int] = {}
        self.blocked: dict[tuple[str, str], deque[str]] = {}
        self.children_sent: dict[str, set[str]] = {}  # by parent run: the child runs whose trigger was sent
        self.owned: set[int] = set()
        # Set once a partition's runs are rebuilt. faust resumes fetching before on_partitions_assigned returns (its
        # recovery task resumes the streams when there are no tables), so inputs can arrive during the replay.
        self.replayed: dict[int, asyncio.Event] = {}
        self.foreign: set[int] = set()  # partitions the last assignment gave to another worker
        self.replaying: dict[int, asyncio.Task[None]] = {}
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

    def _admission(self, tenant_id: str, flow_id: str, *, newcomer: bool = False) -> Admission:
        limit = self.settings.tenant_quotas.get(tenant_id, self.settings.tenant_max_active_runs)
        # A new run queues behind the flow's BLOCKED runs: they are unblocked in arrival order.
        queue = self.blocked.get((tenant_id, flow_id)) if newcomer else None
        ahead = sum(1 for r in queue if r in self.runs) if queue else 0
        return Admission(self.active_flow.get((tenant_id, flow_id), 0), self.active_tenant.get(tenant_id, 0), limit,
                         queued_ahead=ahead)  # fmt: skip

    # ------------------------------------------------------------------ partitions

    async def assign(self, partitions: Iterable[int], *, background: bool = False) -> None:
        """Rebuild the state of each newly assigned partition's runs from the ledger, then resume the open ones.

        `partitions` is the whole assignment. Inputs may already be waiting (`_until_replayed`: faust resumes
        fetching before its rebalance callback returns): those of a partition that went to another worker are
        released to be skipped, those of ours wait for its replay.

        `background=True` (the worker's rebalance callback) starts the replays and returns at once: aiokafka
        sends no heartbeats while the callback runs, so a replay longer than the session timeout would get the
        worker dropped from the group, rejoin, and replay everything again, forever.
        """
        await self.start()
        assigned = set(partitions)
        for partition in [p for p in self.replayed if p not in assigned and p not in self.owned]:
            self.foreign.add(partition)
            self.replayed.pop(partition).set()
        self.foreign -= assigned
        for partition in sorted(assigned - self.owned - self.replaying.keys()):
            self.replaying[partition] = asyncio.create_task(self._replay_logged(partition), name=f"replay:{partition}")
        if not background:
            await asyncio.gather(*[t for p, t in self.replaying.items() if p in assigned])

    async def _replay_logged(self, partition: int) -> None:
        began = time.perf_counter()
        try:
            replayed, resumed = await self._replay(partition)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The partition's runs are in an unknown state and its inputs wait for this replay: start over clean.
            log.critical("partition %s: replay failed; exiting to rebuild from the ledger", partition, exc_info=True)
            os._exit(70)
        finally:
            # Only its own entry: a revoke may have cancelled this replay and a new assignment started another.
            if self.replaying.get(partition) is asyncio.current_task():
                del self.replaying[partition]
        self.finished.compact()
        metrics.ACTIVE_RUNS.set(len(self.runs))
        metrics.REPLAY_SECONDS.observe(time.perf_counter() - began)
        log.info("partition %s: %s events replayed in %.1f s, %s runs resumed", partition, replayed,
                 time.perf_counter() - began, resumed)  # fmt: skip

    async def _replay(self, partition: int) -> tuple[int, int]:
        """Fold the partition's open runs. The events of runs that end in the log are never validated into models
        or folded: a run's raw events wait in `open_raw` only until its terminal event, then only its next seq is
        kept. Most of a long ledger is ended runs, so the replay costs a JSON parse per event, not a fold."""
        open_raw: dict[str, list[dict[str, Any]]] = {}
        ended_children: list[RunState] = []
        recent = (datetime.now(UTC) - CHILD_RENOTIFY_WINDOW).strftime("%Y-%m-%dT%H:%M:%S")  # compared as ISO text
        count = 0
        async for batch in iter_partition_raw(self.settings.kafka_bootstrap, self.ledger.topic, partition):
            count += len(batch)
            for obj in batch:
                run_id, seq, kind = obj.get("run_id"), obj.get("seq"), obj.get("type")
                if not isinstance(run_id, str) or not isinstance(seq, int):
                    log.error("ledger record without run_id/seq in partition %s skipped", partition)
                    continue
                if (done := self.finished.get(run_id)) is not None:
                    # Ended: only its next seq matters (an archive appends there).
                    self.finished[run_id] = max(done, seq + 1)
                    if kind == "RunArchived":
                        self.archived.add(run_id)
                    continue
                raw = open_raw.setdefault(run_id, [])
                raw.append(obj)
                if kind in TERMINAL_EVENT_STATUS:
                    open_raw.pop(run_id)
                    self.finished[run_id] = seq + 1
                    first = raw[0].get("payload") or {}
                    if first.get("parent_run_id") and str(obj.get("occurred_at", "")) >= recent:
                        if (child := _fold_raw(raw)) is not None:
                            ended_children.append(child)
        states = {run_id: state for run_id, raw in open_raw.items() if (state := _fold_raw(raw)) is not None}
        metrics.REPLAY_EVENTS.inc(count)
        for run_id, state in sorted(states.items(), key=lambda item: item[1].created_at):
            live = self.runs.get(run_id)
            if live is not None and live.next_seq >= state.next_seq:
                continue  # already live and newer than the ledger read
            self.partition_of[run_id] = partition
            self._track(None, state)
        self.owned.add(partition)
        self.replayed.setdefault(partition, asyncio.Event()).set()
        # A child that ended just before a crash may not have told its parent: tell it again (the parent
        # recognises the repeat by the child's id). Only recent ends: older ones were told long ago.
        for child in ended_children:
            await self._notify_parent(child)
        resumed = [r for r, p in self.partition_of.items() if p == partition and r in self.runs and r not in self.tasks]
        for run_id in resumed:
            self._drive(run_id)
        return count, len(resumed)

    async def revoke(self, partitions: Iterable[int]) -> None:
        await self.start()
        gone = set(partitions)
        for run_id in [r for r, p in self.partition_of.items() if p in gone]:
            task = self.tasks.pop(run_id, None)
            if task:
                task.cancel()
            step_task = self.step_tasks.pop(run_id, None)
            if step_task:
                step_task.cancel()
            state = self.runs.get(run_id)
            if state is not None:
                self._track(state, None)
            self.partition_of.pop(run_id, None)
            self.wakeups.pop(run_id, None)
            self.children_sent.pop(run_id, None)
        self.owned -= gone
        # Inputs of these partitions now wait for the next assignment to say whether they are still ours.
        for partition in gone:
            self.replayed.pop(partition, None)
            replay = self.replaying.pop(partition, None)
            if replay is not None:
                replay.cancel()
        await self.ledger.producer.flush()

    # ------------------------------------------------------------------ inputs

    async def _until_replayed(self, inputs: list[tuple[int, T]]) -> list[tuple[int, T]]:
        """The inputs to handle now: those of owned partitions, once replayed. A redelivered trigger handled before
        its partition's replay would start its run again from seq 0 (a second, different event at seqs already
        used), a command would be dropped as aimed at an unknown run. Inputs of a partition that went to another
        worker are left to it (their offsets are not ours to commit)."""
        for partition in {p for p, _ in inputs}:
            if partition not in self.owned and partition not in self.foreign:
                await self.replayed.setdefault(partition, asyncio.Event()).wait()
        skipped = [i for i in inputs if i[0] not in self.owned]
        if skipped:
            log.warning("%d input(s) of partitions now owned elsewhere left to their owner", len(skipped))
        return [i for i in inputs if i[0] in self.owned]

    async def on_triggers(self, triggers: list[tuple[int, TriggerReceived]]) -> None:
        """Start a run per new trigger; returns once their first events are durable in the ledger."""
        triggers = await self._until_replayed(triggers)
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
            admission = self._admission(trigger.tenant_id, trigger.flow_id, newcomer=True)
            pending += await self._apply(*decide_and_fold(None, flow, StartRun(trigger, version, admission),
                                                          self.clock()))  # fmt: skip
            metrics.TRIGGERS.labels("started" if flow else "invalid").inc()
            if trigger.run_id in self.runs:
                self._drive(trigger.run_id)
        if pending:
            await asyncio.gather(*pending)

    async def on_commands(self, commands: list[tuple[int, CommandBase]]) -> None:
        """Cancel, resume and child-ended commands; returns once what they caused is durable."""
        commands = await self._until_replayed(commands)
        pending: list[asyncio.Future[object]] = []
        for partition, command in commands:
            if isinstance(command, ArchiveRun):
                pending += await self._archive(partition, command)
                continue
            state = self.runs.get(command.run_id)
            if state is None:
                outcome = "finished" if command.run_id in self.finished else "unknown_run"
                metrics.COMMANDS.labels(command.type, outcome).inc()
                continue
            if not isinstance(command, CancelRun | ResumeRun | ChildRunFinished):
                continue
            before = state.next_seq
            pending += await self.feed(command.run_id, CommandInput(command))
            after = self.runs.get(command.run_id)
            changed = after is None or after.next_seq != before
            metrics.COMMANDS.labels(command.type, "applied" if changed else "ignored").inc()
            if after is None:
                # Ended (canceled): abandon the step in flight; its late result would be ignored anyway.
                step_task = self.step_tasks.pop(command.run_id, None)
                if step_task is not None:
                    step_task.cancel()
            self._wake(command.run_id)
        if pending:
            await asyncio.gather(*pending)

    async def _archive(self, partition: int, command: ArchiveRun) -> list[asyncio.Future[object]]:
        next_seq = self.finished.get(command.run_id)
        if next_seq is None or command.run_id in self.archived:
            outcome = (
                "ignored" if next_seq is not None else ("active" if command.run_id in self.runs else "unknown_run")
            )
            metrics.COMMANDS.labels(command.type, outcome).inc()
            return []
        self.archived.add(command.run_id)
        self.finished[command.run_id] = next_seq + 1
        metrics.COMMANDS.labels(command.type, "applied").inc()
        return await self.ledger.append(partition, [archive(command, next_seq, self.clock())])

    def _wake(self, run_id: str) -> None:
        if run_id not in self.runs:
            return
        if run_id in self.tasks:
            self.wakeups.setdefault(run_id, asyncio.Event()).set()
        else:
            self._drive(run_id)

    def _track(self, before: RunState | None, after: RunState | None) -> None:
        """Keep the active counts and the blocked queues in step with a run's status change."""
        was = before is not None and before.status in _ACTIVE
        now = after is not None and after.status in _ACTIVE
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

    async def _apply(self, events: list[EventBase], state: RunState | None) -> list[asyncio.Future[object]]:
        """`state` is the run after `events` (decide_and_fold folded them as it decided)."""
        if not events:
            return []
        run_id = events[0].run_id
        for event in events:
            _EVENT_COUNTERS[event.type].inc()
        assert state is not None
        before = self.runs.get(run_id)
        if state.terminal:
            if before is not None:  # a run can end in its first decision (INVALID, QUOTA_EXCEEDED)
                self._track(before, None)
            self.finished[run_id] = state.next_seq
            self.wakeups.pop(run_id, None)
            self.children_sent.pop(run_id, None)
        else:
            self._track(before, state)
        metrics.ACTIVE_RUNS.set(len(self.runs))
        # Appending failures crash the worker (faust restarts from the ledger): state here must never
        # run ahead of a ledger that did not take the events.
        futures = await self.ledger.append(self.partition_of[run_id], events)
        if state.terminal:
            if state.parent_run_id is not None:
                await asyncio.gather(*futures)  # the parent hears of the end only once it is recorded
                await self._notify_parent(state)
            if before is not None and before.status in _ACTIVE:
                self._release_slot(state.tenant_id, state.flow_id)
        return futures

    def _release_slot(self, tenant_id: str, flow_id: str) -> None:
        """A run of the flow ended: the first BLOCKED run of the flow (arrival order) asks to start."""
        queue = self.blocked.get((tenant_id, flow_id))
        while queue:
            run_id = queue[0]
            state = self.runs.get(run_id)
            if state is None or state.status != RunStatus.BLOCKED:
                queue.popleft()  # canceled or moved on meanwhile
                continue
            self._wake(run_id)
            return

    async def feed(self, run_id: str, inp: Input) -> list[asyncio.Future[object]]:
        """Decide on `inp` and queue the events; the futures resolve when they are durable. A run's own loop goes
        on without waiting for them: the producer keeps the run's events in order, and a failed append exits the
        process (adapters.ledger), so no decision builds on events the ledger lost."""
        state = self.runs.get(run_id)
        if state is None:
            return []
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        return await self._apply(*decide_and_fold(state, flow, inp, self.clock()))

    # ------------------------------------------------------------------ subflows

    async def _start_child(self, state: RunState, flow: FlowDefinition, step_name: str) -> None:
        """Append the child run's trigger (once per attempt: its run id is derived from the attempt)."""
        step = state.steps[step_name]
        child_id = child_run_id(state.run_id, step_name, step.attempt)
        sent = self.children_sent.setdefault(state.run_id, set())
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
        partition = partition_for(child_id, self.settings.partitions)
        await self.ledger.producer.send_and_wait(
            self.topics.triggers, codec.dumps(trigger), key=child_id.encode(), partition=partition
        )
        sent.add(child_id)

    async def _notify_parent(self, child: RunState) -> None:
        assert child.parent_run_id is not None and child.parent_step is not None
        command = ChildRunFinished(
            tenant_id=child.tenant_id,
            run_id=child.parent_run_id,
            issued_by="executor",
            child_run_id=child.run_id,
            step=child.parent_step,
            attempt=child.parent_attempt or 1,
            status=child.status.value,
            output=run_output(child),
            error=child.last_error,
        )
        partition = partition_for(child.parent_run_id, self.settings.partitions)
        await self.ledger.producer.send_and_wait(
            self.topics.commands, codec.dumps(command), key=child.parent_run_id.encode(), partition=partition
        )

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
            # An executor bug: recorded with its trace, and the run still ends (invariant 5).
            log.exception("run %s: internal error", run_id)
            metrics.INTERNAL_ERRORS.inc()
            state = self.runs.get(run_id)
            if state is not None:
                failure = InternalFailure(run_id, f"{type(exc).__name__}: {exc}", traceback.format_exc(),
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
        """Carry out what the run waits for (services/executor/next.py chooses); False when only a command can
        drive it on."""
        run_id = state.run_id
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        if flow is None:
            raise LookupError(f"flow {state.flow_id} v{state.flow_version} is not in the registry")
        now = datetime.now(UTC)
        queue = self.blocked.get((state.tenant_id, state.flow_id))
        first_blocked = queue is not None and len(queue) > 0 and queue[0] == run_id
        action = next_action.choose(state, flow, now, time_scale=self.settings.time_scale, first_blocked=first_blocked)
        match action:
            case next_action.Deadline():
                await self.feed(run_id, DeadlinePassed(run_id))
            case next_action.ScheduledDue():
                await self.feed(run_id, ScheduledDue(run_id, self._admission(state.tenant_id, state.flow_id)))
            case next_action.TryUnblock():
                assert queue is not None
                before = state.next_seq
                await self.feed(run_id, SlotFreed(run_id, self._admission(state.tenant_id, state.flow_id)))
                after = self.runs.get(run_id)
                if after is None or after.next_seq != before:
                    queue.popleft()
                    self._release_slot(state.tenant_id, state.flow_id)  # room for more than one
                else:
                    await self._wait(run_id, None)  # woken when a run of the flow ends
            case next_action.ExpirePause(request_id):
                await self.feed(run_id, PauseExpired(run_id, request_id))
            case next_action.FireTimer(name, attempt):
                await self.feed(run_id, TimerFired(run_id, name, attempt))
            case next_action.Wait(until):
                await self._wait(run_id, until)
            case next_action.StartChild(name, until):
                await self._start_child(state, flow, name)
                if until is None:
                    return False  # the child's end (a command) drives the run again
                await self._wait(run_id, until)
            case next_action.RunStep(name):
                await self._run_step(state, flow, name, next_action.deadline(state, flow, self.settings.time_scale))
            case next_action.Idle():
                return False
        return True

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
        step_task = asyncio.create_task(self.runners.run(call), name=f"step:{run_id}:{name}:{step.attempt}")
        self.step_tasks[run_id] = step_task
        try:
            timeout = None if deadline is None else max(0.0, (deadline - now).total_seconds())
            done, _ = await asyncio.wait({step_task}, timeout=timeout)
        finally:
            if self.step_tasks.get(run_id) is step_task:
                del self.step_tasks[run_id]
        if not done:
            step_task.cancel()  # the flow deadline passed mid-step: abandon it
            return
        if step_task.cancelled():
            return  # abandoned by a cancel: the run has ended
        outcome = step_task.result()
        metrics.STEP_SECONDS.labels(call.action, "ok" if outcome.ok else "error").observe(outcome.duration_ms / 1000)
        await self.feed(run_id, StepCompleted(
            run_id, name, step.attempt, outcome.ok, outcome.output, outcome.error, outcome.duration_ms
        ))  # fmt: skip

    async def close(self) -> None:
        if self._started:
            await self.ledger.producer.flush()
        for task in [*self.tasks.values(), *self.step_tasks.values()]:
            task.cancel()
        await asyncio.gather(*self.tasks.values(), *self.step_tasks.values(), return_exceptions=True)
        await self.runners.close()
