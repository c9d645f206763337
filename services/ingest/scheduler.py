"""The scheduler: one TriggerReceived per tick of every active cron or interval flow (schedule triggers).

Ticks are computed in UTC: a cron expression (croniter: 5 fields, or a 6th for seconds), or `interval_s`
on a grid counted from the Unix epoch, so every process computes the same ticks whenever it started.

Missed ticks (no scheduler was running, or it fell behind): of the ticks since the last settled one only
the newest fires, and only while it is at most `max_catch_up_s` old; the older ones are skipped, logged
and counted in `flowtrail_ingest_schedule_skipped_ticks_total`. A daily job still runs after a short
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
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas import codec
from schemas.events import (
    FlowEventBase,
    FlowResumed,
    FlowVersionPublished,
    TriggerReceived,
    utcnow,
)
from schemas.flows import FlowDefinition
from schemas.topics import COMPACTED, Topics
from services.common.flowfollow import FlowFollower, FlowKey
from services.common.schedule import (
    COUNT_CAP,
    Clock,
    Due,
    Schedule,
    ScheduleError,
    Windows,
    as_utc,
    plan,
    scheduled_trigger,
    tick_iso,
)
from services.ingest import metrics
from services.ingest.adapters.triggers import TriggerLog

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- settled ticks (Kafka)


class MarkLog:
    """The compacted `<prefix>.schedules` topic: per flow, the newest tick settled (fired or skipped)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> dict[FlowKey, datetime]:
        """Creates the topic when missing and returns what it holds."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            if self.topic not in set(await admin.list_topics()):
                with contextlib.suppress(TopicAlreadyExistsError):  # another scheduler created it meanwhile
                    await admin.create_topics([NewTopic(self.topic, 1, 1, topic_configs=COMPACTED)])
        finally:
            await admin.close()
        await self._started()
        return await self._read()

    async def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def append(self, marks: list[tuple[FlowKey, datetime]]) -> None:
        producer = await self._started()
        futures = []
        try:
            for (tenant_id, flow_id), tick in marks:
                value = codec.dumps({"tenant_id": tenant_id, "flow_id": flow_id, "tick": tick_iso(tick)})
                futures.append(await producer.send(self.topic, value, key=f"{tenant_id}\x1f{flow_id}".encode()))
            await asyncio.gather(*futures)
        except BaseException:
            # A producer that failed once may stay broken (sequence numbers): the next pass starts a fresh one.
            self._producer = None
            with contextlib.suppress(Exception):
                await producer.stop()
            raise

    async def _read(self) -> dict[FlowKey, datetime]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
        await consumer.start()
        marks: dict[FlowKey, datetime] = {}
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    try:
                        mark = codec.loads(record.value)
                        key, tick = (mark["tenant_id"], mark["flow_id"]), as_utc(datetime.fromisoformat(mark["tick"]))
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error("unreadable schedule mark at offset %s: %s", record.offset, exc)
                        continue
                    marks[key] = max(tick, marks.get(key, tick))
        finally:
            await consumer.stop()
        return marks


# ---------------------------------------------------------------- the loop


@dataclass
class _Entry:
    flow: FlowDefinition
    schedule: Schedule
    settled: datetime  # every tick at or before this was fired or skipped
    next_due: datetime | None = field(init=False)

    def __post_init__(self) -> None:
        self.next_due = self.schedule.next_after(self.settled)

    def settle(self, t: datetime) -> None:
        if t > self.settled:
            self.settled = t
            self.next_due = self.schedule.next_after(t)


class Scheduler:
    """Follows the flows topic and appends each due tick's trigger; `clock` gives schedule time, `time_scale`
    converts schedule seconds into real ones for sleeping (1.0 with the wall clock)."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        triggers: TriggerLog,
        *,
        clock: Clock = utcnow,
        time_scale: float = 1.0,
        max_catch_up_s: float = 3600.0,
        poll_s: float = 1.0,
        windows: Windows | None = None,
        accepted: Callable[[list[TriggerReceived]], Awaitable[None]] | None = None,
    ) -> None:
        self.triggers = triggers
        self.accepted = accepted
        # A syncing flow's tick reads the window from where its last successful run ended up to the tick.
        self.windows = windows
        self.clock = clock
        self.time_scale = time_scale
        self.max_catch_up_s = max_catch_up_s
        self.poll_s = poll_s
        self.flows = FlowFollower(bootstrap, topics.flows, on_event=self._on_flow_event)
        self.marks = MarkLog(bootstrap, f"{topics.prefix}.schedules")
        self.observed: datetime | None = None  # the clock time of the last completed pass
        self._entries: dict[FlowKey, _Entry] = {}
        self._marked: dict[FlowKey, datetime] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reads the settled ticks and every flow, then fires ticks in a background task."""
        self._marked = await self.marks.start()
        await self.flows.start()
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flows.stop()
        await self.marks.stop()

    def _on_flow_event(self, event: FlowEventBase) -> None:
        key = (event.tenant_id, event.flow_id)
        entry = self._entries.get(key)
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
            if schedule is None:
                self._entries.pop(key, None)
            else:
                # A new version's schedule applies from its publication: its first tick is the next one after.
                since = [as_utc(event.occurred_at)] + [t for t in (self._marked.get(key), entry and entry.settled) if t]
                self._entries[key] = _Entry(flow, schedule, max(since))
        elif isinstance(event, FlowResumed) and entry is not None:
            entry.settle(as_utc(event.occurred_at))  # ticks while paused are not missed ones: the next one fires
        metrics.SCHEDULES.set(len(self._entries))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            wait = self.poll_s
            try:
                await self.run_pass(self.clock())
                wait = self._until_next_due()
            except Exception:  # Kafka away: keep the loop, retry the same ticks (same run ids) shortly
                log.exception("scheduler pass failed; retrying in %.1f s", self.poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _until_next_due(self) -> float:
        """Real seconds until the next tick of an active flow, at most `poll_s` (clocks jump; flows change)."""
        dues = [e.next_due for k, e in self._entries.items() if e.next_due is not None and k not in self.flows.paused]
        if not dues:
            return self.poll_s
        return min(self.poll_s, max(0.0, (min(dues) - self.clock()).total_seconds() * self.time_scale))

    async def run_pass(self, now: datetime) -> None:
        """Fires every tick due at `now`; returns once their triggers and the settled marks are durable."""
        self._wake.clear()  # a flow event from here on wakes the next sleep at once
        dues: list[tuple[FlowKey, Due]] = []
        fired: list[tuple[datetime, TriggerReceived]] = []
        for key, entry in self._entries.items():
            if key in self.flows.paused or entry.next_due is None or now < entry.next_due:
                continue
            due = plan(entry.schedule, entry.settled, now, self.max_catch_up_s)
            if due is not None:
                dues.append((key, due))
                if due.fire is not None:
                    fired.append((due.fire, scheduled_trigger(entry.flow, due.fire, now)))
        if fired and self.windows is not None:
            fired = [(tick, await self._with_window(t, tick)) for tick, t in fired]
        if fired:
            await self.triggers.append([(t.run_id, codec.dumps(t)) for _, t in fired])
            if self.accepted is not None:  # a tick's run is visible from the moment it is durable
                await self.accepted([t for _, t in fired])
            durable = self.clock()
            for tick, _ in fired:
                metrics.SCHEDULE_LATENESS.observe((durable - tick).total_seconds())
            metrics.TRIGGERS.labels("schedule").inc(len(fired))
            metrics.SCHEDULE_TICKS.inc(len(fired))
        if dues:
            await self.marks.append([(key, due.settled) for key, due in dues])
        for key, due in dues:
            if due.skipped:
                self._log_skipped(key, due)
            current = self._entries.get(key)  # maybe a new version's, published meanwhile
            if current is not None:
                current.settle(due.settled)
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
                        *key, count, tick_iso(due.settled), self.max_catch_up_s)  # fmt: skip
        else:
            log.warning("flow %s/%s: %s missed tick(s) skipped; catching up with the newest, %s",
                        *key, count, tick_iso(due.fire))  # fmt: skip
