"""The run engine: owns the runs of its partitions, feeds inputs to `decide`, appends what it decides.

It composes the parts that each own their state: partition ownership and replay (`partitions.py`, `replay.py`),
admission — the live runs, and what limits count over every executor (`admission.py`, `adapters/slots.py`) —,
subflows (`subflows.py`) and the run loop that carries out each run's next action (`runloop.py`, choosing with the
pure `next.py`). What it keeps itself is what every input needs: the runs that ended (`finished.py`) and the ones
archived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from schemas import codec
from schemas.events import (
    ArchiveRun,
    CancelRun,
    ChildRunFinished,
    CommandBase,
    EventBase,
    ResumeRun,
    SlotAvailable,
    TriggerReceived,
)
from schemas.flows import FlowDefinition
from schemas.status import RunStatus
from schemas.topics import Topics, partition_for
from services.executor import metrics
from services.executor.adapters.flows import FlowRegistry
from services.executor.adapters.ledger import LedgerWriter
from services.executor.adapters.slots import Holder, SharedSlots
from services.executor.adapters.snapshots import SnapshotStore, Snapshotter, scan_partition
from services.executor.adapters.steps import StepRunners
from services.executor.admission import Admitter, LiveRuns, holds_or_waits, is_active
from services.executor.decide import (
    Admission,
    Clock,
    CommandInput,
    Input,
    StartRun,
    archive,
    decide_and_fold,
    reaches_admission,
)
from services.executor.finished import FinishedRuns
from services.executor.fold import RunState
from services.executor.partitions import Partitions
from services.executor.replay import PartitionScan
from services.executor.runloop import RunLoop
from services.executor.settings import ExecutorSettings
from services.executor.subflows import Subflows


class _EventCounters(dict[str, Any]):
    """metrics.EVENTS children by event type, resolved once each (labels() per event costs ~6 µs)."""

    def __missing__(self, event_type: str) -> Any:
        child = self[event_type] = metrics.EVENTS.labels(event_type)
        return child


_EVENT_COUNTERS = _EventCounters()
log = logging.getLogger(__name__)

# How often the tenants' stored quotas are read, and BLOCKED runs of owned partitions are checked against the shared
# admission for a free slot: a wake-up lost to a crash between a release and its SlotAvailable command is found
# within this.
ADMISSION_SWEEP_S = 2.0


class Engine:
    def __init__(self, settings: ExecutorSettings, ledger: LedgerWriter, flows: FlowRegistry) -> None:
        self.settings = settings
        self.ledger = ledger
        self.flows = flows
        self.runners = StepRunners.from_settings(settings)
        # Terminal runs and their next seq: a redelivered trigger for one is ignored, an archive appends at that seq.
        self.finished = FinishedRuns()
        self.archived: set[str] = set()
        self.live = LiveRuns()
        self.admitter = Admitter(settings, SharedSlots(settings.database_url, settings.database_schema,
                                                       repair=self._repair_admission))  # fmt: skip
        # Set once a partition's rows in the shared admission agree with its replayed runs; its runs ask only after.
        self.reconciled: dict[int, asyncio.Event] = {}
        self._reconciling: dict[int, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.partitions = Partitions(self._load, self._resume)
        self.snapshots = SnapshotStore(settings.kafka_bootstrap, Topics(settings.topic_prefix), settings.partitions)
        self.snapshotter = Snapshotter(
            settings.kafka_bootstrap, ledger.topic, self.snapshots, lambda: set(self.partitions.owned),
            interval_s=settings.snapshot_interval_s, min_events=settings.snapshot_min_events,
        )  # fmt: skip
        self.subflows = Subflows(Topics(settings.topic_prefix), settings.partitions, ledger)
        self.loop = RunLoop(settings, flows, self.live, self.subflows, self.runners, self.feed, self.ask_to_start)
        self._started = False
        self._start_lock = asyncio.Lock()

    @property
    def runs(self) -> dict[str, RunState]:
        """The runs not yet terminal."""
        return self.live.runs

    @property
    def owned(self) -> set[int]:
        return self.partitions.owned

    @property
    def replaying(self) -> dict[int, asyncio.Task[None]]:
        return self.partitions.replaying

    async def start(self) -> None:
        """Idempotent: faust may signal a rebalance before its own services have started."""
        async with self._start_lock:
            if not self._started:
                await self.ledger.start()
                await self.flows.start()
                self.snapshotter.start()
                self.admitter.slots.start()
                self._sweeper = asyncio.create_task(self._sweep(), name="admission-sweep")
                self._started = True

    def clock(self) -> Clock:
        return Clock(now=datetime.now(UTC), time_scale=self.settings.time_scale)

    # ------------------------------------------------------------------ partitions

    async def assign(self, partitions: Iterable[int], *, background: bool = False) -> None:
        """Rebuild the state of each newly assigned partition's runs from the ledger, then resume the open ones
        (`Partitions.assign` says when inputs wait and why the worker's callback replays in the background)."""
        await self.start()
        await self.partitions.assign(partitions, background=background)

    async def _load(self, partition: int) -> PartitionScan:
        """Fold the partition's open runs into the live ones: its latest snapshot and the ledger after it (or the
        whole ledger partition), then the partition's ended and archived runs joined to the engine's."""
        scan = await scan_partition(self.settings.kafka_bootstrap, self.ledger.topic, self.snapshots, partition)
        metrics.REPLAY_EVENTS.inc(scan.replayed)
        self.snapshotter.replayed(scan)
        self.finished.absorb(partition, scan.finished)
        self.archived |= scan.archived
        for state in scan.open_runs():
            live = self.live.get(state.run_id)
            if live is not None and live.next_seq >= state.next_seq:
                continue  # already live and newer than the ledger read
            self.partitions.claim(state.run_id, partition)
            self.live.track(None, state)
        self._start_reconcile(partition)
        return scan

    async def _resume(self, partition: int, scan: PartitionScan) -> int:
        """Once the partition is owned: tell parents of recently ended children, drive the open runs."""
        # A child that ended just before a crash may not have told its parent: tell it again (the parent
        # recognises the repeat by the child's id). Only recent ends: older ones were told long ago.
        for child in scan.ended_children:
            await self.subflows.notify_parent(child)
        resumed = [r for r in self.partitions.runs_of(partition) if r in self.live and r not in self.loop.tasks]
        for run_id in resumed:
            self.loop.drive(run_id)
        self.finished.compact()
        metrics.ACTIVE_RUNS.set(len(self.live))
        return len(resumed)

    async def revoke(self, partitions: Iterable[int]) -> None:
        await self.start()
        partitions = list(partitions)
        for partition in partitions:
            self.reconciled.pop(partition, None)
            task = self._reconciling.pop(partition, None)
            if task is not None:
                task.cancel()
        for run_id in self.partitions.revoke(partitions):
            self.loop.stop(run_id)
            state = self.live.get(run_id)
            if state is not None:
                self.live.track(state, None)
            self.subflows.forget(run_id)
        await self.ledger.flush()

    # ------------------------------------------------------------------ inputs

    async def on_triggers(self, triggers: list[tuple[int, TriggerReceived]]) -> list[asyncio.Future[object]]:
        """Start a run per new trigger; returns the futures of their first events, which resolve once those are durable
        in the ledger (the triggers' offsets may commit only then)."""
        triggers = await self.partitions.until_replayed(triggers)
        pending: list[asyncio.Future[object]] = []
        for partition, trigger in triggers:
            if trigger.run_id in self.finished or trigger.run_id in self.live:
                metrics.TRIGGERS.labels("duplicate").inc()
                if trigger.run_id in self.live and trigger.run_id not in self.loop.tasks:
                    self.loop.drive(trigger.run_id)
                continue
            flow = self.flows.get(trigger.tenant_id, trigger.flow_id, trigger.flow_version)
            if flow is None:
                await self.flows.catch_up()
                flow = self.flows.get(trigger.tenant_id, trigger.flow_id, trigger.flow_version)
            version = flow.version if flow else (trigger.flow_version or 0)
            self.partitions.claim(trigger.run_id, partition)
            clock = self.clock()
            admission = Admission()
            if flow is not None and reaches_admission(flow, trigger, clock.now):
                admission = await self._ask(trigger.run_id, trigger.tenant_id, flow, partition, waiting=False)
                clock = self.clock()  # RunStarted is stamped after its grant, never before the slot was free
            try:
                pending += await self._apply(*decide_and_fold(None, flow, StartRun(trigger, version, admission), clock))
            finally:
                await self._settle(trigger.run_id, trigger.tenant_id, flow)
            metrics.TRIGGERS.labels("started" if flow else "invalid").inc()
            if trigger.run_id in self.live:
                self.loop.drive(trigger.run_id)
        return pending

    async def on_commands(self, commands: list[tuple[int, CommandBase]]) -> list[asyncio.Future[object]]:
        """Cancel, resume, archive, slot and child-ended commands; returns the futures of what they caused, which
        resolve once it is durable."""
        commands = await self.partitions.until_replayed(commands)
        pending: list[asyncio.Future[object]] = []
        for partition, command in commands:
            if isinstance(command, ArchiveRun):
                pending += await self._archive(partition, command)
                continue
            if isinstance(command, SlotAvailable):
                blocked = (state := self.live.get(command.run_id)) is not None and state.status == RunStatus.BLOCKED
                metrics.COMMANDS.labels(command.type, "applied" if blocked else "ignored").inc()
                if blocked:
                    self.loop.wake(command.run_id)
                continue
            state = self.live.get(command.run_id)
            if state is None:
                outcome = "finished" if command.run_id in self.finished else "unknown_run"
                metrics.COMMANDS.labels(command.type, outcome).inc()
                continue
            if not isinstance(command, CancelRun | ResumeRun | ChildRunFinished):
                continue
            before = state.next_seq
            pending += await self.feed(command.run_id, CommandInput(command))
            after = self.live.get(command.run_id)
            changed = after is None or after.next_seq != before
            metrics.COMMANDS.labels(command.type, "applied" if changed else "ignored").inc()
            if after is None:
                self.loop.abandon_step(command.run_id)  # ended (canceled)
            self.loop.wake(command.run_id)
        return pending

    async def _archive(self, partition: int, command: ArchiveRun) -> list[asyncio.Future[object]]:
        next_seq = self.finished.get(command.run_id)
        if next_seq is None or command.run_id in self.archived:
            outcome = (
                "ignored" if next_seq is not None else ("active" if command.run_id in self.live else "unknown_run")
            )
            metrics.COMMANDS.labels(command.type, outcome).inc()
            return []
        self.archived.add(command.run_id)
        self.finished[command.run_id] = next_seq + 1
        metrics.COMMANDS.labels(command.type, "applied").inc()
        return await self.ledger.append(partition, [archive(command, next_seq, self.clock())])

    async def feed(self, run_id: str, inp: Input) -> list[asyncio.Future[object]]:
        """Decide on `inp` and queue the events; the futures resolve when they are durable. A run's own loop goes
        on without waiting for them: the producer keeps the run's events in order, and a failed append exits the
        process (adapters.ledger), so no decision builds on events the ledger lost."""
        state = self.live.get(run_id)
        if state is None:
            return []
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        return await self._apply(*decide_and_fold(state, flow, inp, self.clock()))

    async def _apply(self, events: list[EventBase], state: RunState | None) -> list[asyncio.Future[object]]:
        """`state` is the run after `events` (decide_and_fold folded them as it decided)."""
        if not events:
            return []
        run_id = events[0].run_id
        for event in events:
            _EVENT_COUNTERS[event.type].inc()
        assert state is not None
        before = self.live.get(run_id)
        if state.terminal:
            if before is not None:  # a run can end in its first decision (INVALID, QUOTA_EXCEEDED)
                self.live.track(before, None)
            self.finished[run_id] = state.next_seq
            self.loop.ended(run_id)
            self.subflows.forget(run_id)
        else:
            self.live.track(before, state)
        metrics.ACTIVE_RUNS.set(len(self.live))
        # Appending failures crash the worker (faust restarts from the ledger): state here must never
        # run ahead of a ledger that did not take the events.
        futures = await self.ledger.append(self.partitions.of(run_id), events)
        if state.terminal and state.parent_run_id is not None:
            await asyncio.gather(*futures)  # the parent hears of the end only once it is recorded
            await self.subflows.notify_parent(state)
        if holds_or_waits(before) and not holds_or_waits(state):
            flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
            if self.admitter.limited(state.tenant_id, flow):
                await asyncio.gather(*futures)  # the slot is free once the end is recorded, not before
                await self._release(run_id, state.tenant_id, state.flow_id)
        return futures

    # ------------------------------------------------------------------ shared admission

    async def _ask(self, run_id: str, tenant_id: str, flow: FlowDefinition, partition: int, *,
                   waiting: bool) -> Admission:  # fmt: skip
        """The counts `decide` starts, blocks or refuses the run by: the shared admission's, when a limit applies."""
        reconciled = self.reconciled.get(partition)
        if reconciled is not None and self.admitter.limited(tenant_id, flow):
            await reconciled.wait()
        return await self.admitter.ask(run_id, tenant_id, flow, partition, waiting=waiting)

    async def ask_to_start(self, run_id: str, make: Callable[[Admission], Input]) -> None:
        """A SCHEDULED run whose time came, or a BLOCKED or QUEUED run, asks to start (`make` builds ScheduledDue or
        SlotFreed) with the counts of the shared admission."""
        state = self.live.get(run_id)
        if state is None:
            return
        flow = self.flows.get(state.tenant_id, state.flow_id, state.flow_version)
        if flow is None:
            raise LookupError(f"flow {state.flow_id} v{state.flow_version} is not in the registry")
        try:
            admission = await self._ask(run_id, state.tenant_id, flow, self.partitions.of(run_id),
                                        waiting=state.status == RunStatus.BLOCKED)  # fmt: skip
            await self.feed(run_id, make(admission))
        finally:
            await self._settle(run_id, state.tenant_id, flow)

    async def _settle(self, run_id: str, tenant_id: str, flow: FlowDefinition | None) -> None:
        """After a decision on a run whose admission was asked: a row the decision did not use goes (the run was
        canceled meanwhile, or ended in its first decision)."""
        if run_id not in self.admitter.asking:
            return
        self.admitter.asking.discard(run_id)
        state = self.live.get(run_id)
        if not holds_or_waits(state) and flow is not None:
            await self._release(run_id, tenant_id, flow.id)

    async def _release(self, run_id: str, tenant_id: str, flow_id: str) -> None:
        """The run's row goes; the BLOCKED runs of its flow a freed slot lets start are woken: here, or by a
        SlotAvailable command to the executor that owns them."""
        for waiting, partition in await self.admitter.slots.release(run_id, tenant_id, flow_id):
            if partition in self.owned:
                if waiting in self.live:
                    metrics.ADMISSION_WAKEUPS.labels("local").inc()
                    self.loop.wake(waiting)
                continue
            metrics.ADMISSION_WAKEUPS.labels("command").inc()
            command = SlotAvailable(tenant_id=tenant_id, run_id=waiting, issued_by="executor")
            await self.ledger.producer.send_and_wait(
                self.subflows.topics.commands, codec.dumps(command), key=waiting.encode(),
                partition=partition_for(waiting, self.settings.partitions),
            )  # fmt: skip

    def _start_reconcile(self, partition: int) -> None:
        """Once the partition's runs are folded, before any of them asks: its rows in the shared admission are made
        to agree with them (in the background: a partition of unlimited runs never waits for PostgreSQL)."""
        self.reconciled[partition] = done = asyncio.Event()
        holding, keep = self._admission_rows(partition)

        async def reconcile() -> None:
            removed = await self.admitter.slots.reconcile(partition, holding, keep)
            if removed:
                log.info("partition %s: %d stale admission rows removed", partition, removed)
            done.set()

        task = asyncio.create_task(reconcile(), name=f"admission-reconcile:{partition}")
        self._reconciling[partition] = task
        task.add_done_callback(lambda t: self._reconciling.pop(partition, None) if self._reconciling.get(partition)
                               is t else None)  # fmt: skip

    def _admission_rows(self, partition: int) -> tuple[list[Holder], list[str]]:
        """The partition's rows as its live runs say: slots of its active limited runs, and the runs whose rows stay
        (BLOCKED ones, and any run asking now)."""
        runs = [s for r in self.partitions.runs_of(partition) if (s := self.live.get(r)) is not None]
        flows = {(s.tenant_id, s.flow_id, s.flow_version): self.flows.get(s.tenant_id, s.flow_id, s.flow_version)
                 for s in runs}  # fmt: skip
        keep = [s.run_id for s in runs if s.status == RunStatus.BLOCKED] + list(self.admitter.asking)
        return self.admitter.holders(runs, flows), keep

    async def _repair_admission(self) -> None:
        """PostgreSQL restarted and may have lost the last admissions it acknowledged (they commit without waiting
        for the WAL flush): every owned partition's rows are written again from the live runs."""
        for partition in sorted(self.owned):
            holding, keep = self._admission_rows(partition)
            await self.admitter.slots.reconcile(partition, holding, keep)

    async def _sweep(self) -> None:
        """Every ADMISSION_SWEEP_S: take the tenants' stored quotas, and wake the BLOCKED runs of owned partitions
        that a free slot lets start."""
        while True:
            try:
                await self._refresh_quotas()
                if self.live.blocked():
                    await self._wake_startable()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("admission sweep failed")
            await asyncio.sleep(ADMISSION_SWEEP_S)

    async def _refresh_quotas(self) -> None:
        """The operator API's quotas; a tenant that newly has one gets slots for its runs already active here, so
        they count from now on."""
        stored = await self.admitter.slots.stored_quotas()
        new = set(stored) - set(self.admitter.stored)
        self.admitter.stored = stored
        if new:
            holders = [(Holder(s.run_id, s.tenant_id, s.flow_id), p) for s in list(self.live.runs.values())
                       if s.tenant_id in new and is_active(s)
                       and (p := self.partitions.partition_of.get(s.run_id)) is not None]  # fmt: skip
            if holders:
                await self.admitter.slots.hold(holders)

    async def _wake_startable(self) -> None:
        """A wake-up lost to a crash between a release and its SlotAvailable command is found here."""
        for run_id in await self.admitter.slots.may_start(self.owned):
            state = self.live.get(run_id)
            if state is not None and state.status == RunStatus.BLOCKED:
                metrics.ADMISSION_WAKEUPS.labels("sweep").inc()
                self.loop.wake(run_id)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._reconciling.values()):
            task.cancel()
        await self.admitter.slots.close()
        await self.snapshotter.close()
        if self._started:
            await self.ledger.flush()
        await self.loop.close()
        await self.runners.close()
