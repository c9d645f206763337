"""The scheduler: one TriggerReceived per tick of every active cron or interval flow (schedule triggers).

The Kafka I/O around the schedule math of `services/common/schedule.py` (ticks in UTC, the missed-tick policy, a
tick's run, the `Timetable` of scheduled flows): it follows the flows topic, appends each due tick's trigger and
records the settled ticks. Missed ticks (no scheduler was running, or it fell behind): of the ticks since the last
settled one only the newest fires, and only while it is at most `max_catch_up_s` old; the older ones are skipped,
logged and counted in `flowtrail_ingest_schedule_skipped_ticks_total`. A daily job still runs after a short
outage, and a per-minute job does not fire a burst of stale runs after a long one.

A tick's run id is `run_sched_<uuid5(tenant, flow, tick)>`: two schedulers (several ingest replicas), or
one restarted, append the same run id at worst, and the executor starts a run id once. The newest settled
tick of each flow goes to the compacted `<prefix>.schedules` topic after its trigger is durable, and is
read back on start, so a restarted scheduler knows which ticks it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from aiokafka.admin import NewTopic

from schemas import codec
from schemas.events import (
    FlowEventBase,
    FlowResumed,
    FlowVersionPublished,
    TriggerReceived,
    utcnow,
)
from schemas.topics import COMPACTED, Topics
from services.common import kafka
from services.common.appender import Appender
from services.common.flowfollow import FlowFollower, FlowKey, cancelled
from services.common.schedule import (
    COUNT_CAP,
    Clock,
    Due,
    Schedule,
    ScheduleError,
    Timetable,
    Windows,
    as_utc,
    scheduled_trigger,
    tick_iso,
)
from services.common.triggerlog import TriggerLog
from services.ingest import metrics

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- settled ticks (Kafka)


class MarkLog:
    """The compacted `<prefix>.schedules` topic: per flow, the newest tick settled (fired or skipped)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        # Its producer is rebuilt after any failure, so a failed pass leaves the next one a working one.
        self._appender = Appender(bootstrap, linger_ms=0, client_id="flowtrail-scheduler")

    async def start(self) -> dict[FlowKey, datetime]:
        """Creates the topic when missing and returns what it holds."""
        await kafka.create_missing(self.bootstrap, [NewTopic(self.topic, 1, 1, topic_configs=COMPACTED)])
        await self._appender.start()
        return await self._read()

    async def stop(self) -> None:
        await self._appender.stop()

    async def append(self, marks: list[tuple[FlowKey, datetime]]) -> None:
        records = [(f"{tenant_id}\x1f{flow_id}".encode(),
                    codec.dumps({"tenant_id": tenant_id, "flow_id": flow_id, "tick": tick_iso(tick)}), 0)
                   for (tenant_id, flow_id), tick in marks]  # fmt: skip
        await self._appender.append(self.topic, records)

    async def _read(self) -> dict[FlowKey, datetime]:
        marks: dict[FlowKey, datetime] = {}
        async for batch in kafka.read_to_end(self.bootstrap, self.topic, 0):
            for record in batch:
                try:
                    mark = codec.loads(record.value)
                    key, tick = (mark["tenant_id"], mark["flow_id"]), as_utc(datetime.fromisoformat(mark["tick"]))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("unreadable schedule mark at offset %s: %s", record.offset, exc)
                    continue
                marks[key] = max(tick, marks.get(key, tick))
        return marks


# ---------------------------------------------------------------- the loop


@dataclass(frozen=True)
class SchedulerTiming:
    """The scheduler's sense of time: `clock` gives schedule time, `time_scale` converts schedule seconds into real
    ones for sleeping (1.0 with the wall clock)."""

    clock: Clock = utcnow
    time_scale: float = 1.0
    max_catch_up_s: float = 3600.0  # the newest missed tick still fires while at most this old
    poll_s: float = 1.0  # the longest sleep between passes, and the pause after a failed one


class Scheduler:
    """Follows the flows topic and appends each due tick's trigger, timed by `timing`."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        triggers: TriggerLog,
        *,
        timing: SchedulerTiming = SchedulerTiming(),
        windows: Windows | None = None,
        accepted: Callable[[list[TriggerReceived]], Awaitable[None]] | None = None,
    ) -> None:
        self.triggers = triggers
        self.accepted = accepted
        # A syncing flow's tick reads the window from where its last successful run ended up to the tick.
        self.windows = windows
        self.timing = timing
        self.flows = FlowFollower(bootstrap, topics.flows, on_event=self._on_flow_event)
        self.marks = MarkLog(bootstrap, f"{topics.prefix}.schedules")
        self.observed: datetime | None = None  # the clock time of the last completed pass
        self.timetable = Timetable()
        self._marked: dict[FlowKey, datetime] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reads the settled ticks and every flow, then fires ticks in a background task."""
        self._marked = await self.marks.start()
        await self.flows.start()
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        await cancelled(self._task)
        await self.flows.stop()
        await self.marks.stop()

    def _on_flow_event(self, event: FlowEventBase) -> None:
        key = (event.tenant_id, event.flow_id)
        if isinstance(event, FlowVersionPublished):
            flow = event.flow
            if self.flows.latest.get(key) is not flow:
                return  # an older version published late changes nothing
            try:
                schedule = Schedule.of(flow.trigger)
            except ScheduleError as exc:
                log.error("flow %s/%s version %d: schedule not started: %s", *key, flow.version, exc)
                metrics.SCHEDULE_INVALID.inc()
                schedule = None
            self.timetable.published(key, flow, schedule, event.occurred_at, self._marked.get(key))
        elif isinstance(event, FlowResumed):
            self.timetable.resumed(key, event.occurred_at)
        metrics.SCHEDULES.set(len(self.timetable))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            wait = self.timing.poll_s
            try:
                await self.run_pass(self.timing.clock())
                wait = self.timetable.sleep_s(
                    self.timing.clock(), self.flows.paused, self.timing.poll_s, self.timing.time_scale
                )
            except Exception:  # Kafka away: keep the loop, retry the same ticks (same run ids) shortly
                log.exception("scheduler pass failed; retrying in %.1f s", self.timing.poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def run_pass(self, now: datetime) -> None:
        """Fires every tick due at `now`; returns once their triggers and the settled marks are durable."""
        self._wake.clear()  # a flow event from here on wakes the next sleep at once
        planned = self.timetable.due(now, self.flows.paused, self.timing.max_catch_up_s)
        fired = [(due.fire, scheduled_trigger(entry.flow, due.fire, now))
                 for _, entry, due in planned if due.fire is not None]  # fmt: skip
        if fired and self.windows is not None:
            fired = [(tick, await self._with_window(t, tick)) for tick, t in fired]
        if fired:
            await self.triggers.append([(t.run_id, codec.dumps(t)) for _, t in fired])
            if self.accepted is not None:  # a tick's run is visible from the moment it is durable
                await self.accepted([t for _, t in fired])
            durable = self.timing.clock()
            for tick, _ in fired:
                metrics.SCHEDULE_LATENESS.observe((durable - tick).total_seconds())
            metrics.TRIGGERS.labels("schedule").inc(len(fired))
            metrics.SCHEDULE_TICKS.inc(len(fired))
        if planned:
            await self.marks.append([(key, due.settled) for key, _, due in planned])
        for key, _, due in planned:
            if due.skipped:
                self._log_skipped(key, due)
            self.timetable.settle(key, due.settled)
        self.observed = now

    async def _with_window(self, trigger: TriggerReceived, tick: datetime) -> TriggerReceived:
        assert self.windows is not None and trigger.flow_version is not None
        window = await self.windows(trigger.tenant_id, trigger.flow_id, trigger.flow_version, tick)
        return trigger if window is None else trigger.model_copy(update={"cursor_window": window})

    def _log_skipped(self, key: FlowKey, due: Due) -> None:
        metrics.SCHEDULE_SKIPPED.inc(due.skipped)
        count = f"at least {due.skipped}" if due.skipped >= COUNT_CAP else str(due.skipped)
        if due.fire is None:
            log.warning("flow %s/%s: %s missed tick(s) up to %s skipped: the newest is older than max_catch_up_s=%gs",
                        *key, count, tick_iso(due.settled), self.timing.max_catch_up_s)  # fmt: skip
        else:
            log.warning("flow %s/%s: %s missed tick(s) skipped; catching up with the newest, %s",
                        *key, count, tick_iso(due.fire))  # fmt: skip
