"""The scheduler: one TriggerReceived per tick of every active cron or interval flow (DESIGN 1, seed 002 `schedule`).

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
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from croniter import CroniterBadDateError, croniter

from schemas import codec
from schemas.events import (
    CursorWindow,
    ExecutionMode,
    FlowEventBase,
    FlowResumed,
    FlowVersionPublished,
    TriggerInfo,
    TriggerReceived,
    TriggerType,
    utcnow,
)
from schemas.flows import FlowDefinition, TriggerConfig
from schemas.topics import COMPACTED, Topics
from services.common.flowfollow import FlowFollower, FlowKey
from services.ingest import metrics
from services.ingest.adapters.triggers import TriggerLog

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_INTERVAL_S = 1.0
# Counting the missed ticks of a per-second cron over months would stall the loop: beyond this, "at least".
COUNT_CAP = 10_000
_RUN_NS = uuid.UUID("e1acf6a7-abb3-4f88-a3ef-16abc34d858d")

Clock = Callable[[], datetime]


class ScheduleError(ValueError):
    """A schedule trigger that cannot run; the message says why, for the operator reading the log."""


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _micros(t: datetime) -> int:
    d = _utc(t) - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _at(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


# ---------------------------------------------------------------- tick arithmetic (pure)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A flow's tick times: a cron expression, or an interval in microseconds."""

    cron: str | None = None
    interval_us: int = 0

    @classmethod
    def of(cls, trigger: TriggerConfig) -> Schedule | None:
        """The schedule of a trigger config; None when it is not a `schedule` trigger, ScheduleError when bad."""
        if trigger.type != "schedule":
            return None
        if trigger.cron is not None and trigger.interval_s is not None:
            raise ScheduleError("give either `cron` or `interval_s`, not both")
        if trigger.cron is not None:
            return cls.from_cron(trigger.cron)
        if trigger.interval_s is not None:
            if not trigger.interval_s >= MIN_INTERVAL_S:  # also refuses NaN
                raise ScheduleError(f"`interval_s` must be at least {MIN_INTERVAL_S:g} s, got {trigger.interval_s!r}")
            return cls(interval_us=round(trigger.interval_s * 1_000_000))
        raise ScheduleError("a `schedule` trigger needs `cron` or `interval_s`")

    @classmethod
    def from_cron(cls, expression: str) -> Schedule:
        if not croniter.is_valid(expression):
            raise ScheduleError(
                f"{expression!r} is not a cron expression (5 fields, UTC: minute hour day-of-month month "
                "day-of-week; a 6th for seconds)"
            )
        schedule = cls(cron=expression)
        if schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC)) is None:
            raise ScheduleError(f"cron {expression!r} matches no date")
        return schedule

    def next_after(self, t: datetime) -> datetime | None:
        """The first tick strictly after `t` (None: the cron matches no later date)."""
        if self.cron is None:
            return _at((_micros(t) // self.interval_us + 1) * self.interval_us)
        try:
            return _utc(croniter(self.cron, _utc(t)).get_next(datetime))
        except CroniterBadDateError:
            return None

    def latest_at(self, t: datetime) -> datetime | None:
        """The last tick at or before `t`."""
        if self.cron is None:
            return _at(_micros(t) // self.interval_us * self.interval_us)
        t = _utc(t)
        if self.next_after(t - timedelta(microseconds=1)) == t:
            return t
        try:
            return _utc(croniter(self.cron, t).get_prev(datetime))
        except CroniterBadDateError:
            return None

    def count_between(self, after: datetime, before: datetime) -> int:
        """How many ticks lie strictly between the two times (at most COUNT_CAP)."""
        if self.cron is None:
            first = _micros(after) // self.interval_us + 1
            last = -(-_micros(before) // self.interval_us) - 1
            return max(0, min(last - first + 1, COUNT_CAP))
        ticks = croniter(self.cron, _utc(after))
        count = 0
        try:
            while count < COUNT_CAP and _utc(ticks.get_next(datetime)) < before:
                count += 1
        except CroniterBadDateError:
            pass
        return count


@dataclass(frozen=True, slots=True)
class Due:
    """What one pass does about one flow: fire `fire` (or nothing), skip `skipped` ticks, settle up to `settled`."""

    fire: datetime | None
    skipped: int
    settled: datetime


def plan(schedule: Schedule, settled: datetime, now: datetime, max_catch_up_s: float) -> Due | None:
    """The missed-tick policy over the ticks in (settled, now]: the newest fires unless older than
    `max_catch_up_s`; every other one is skipped. None when no tick is due."""
    newest = schedule.latest_at(now)
    if newest is None or newest <= settled:
        return None
    skipped = schedule.count_between(settled, newest)
    if (now - newest).total_seconds() > max_catch_up_s:
        return Due(None, skipped + 1, newest)
    return Due(newest, skipped, newest)


def tick_iso(tick: datetime) -> str:
    return _utc(tick).isoformat().replace("+00:00", "Z")


def scheduled_run_id(tenant_id: str, flow_id: str, tick: datetime) -> str:
    """The same id for a tick in every process, so a tick fired twice starts one run."""
    return "run_sched_" + uuid.uuid5(_RUN_NS, f"{tenant_id}\x1f{flow_id}\x1f{tick_iso(tick)}").hex


def scheduled_trigger(flow: FlowDefinition, tick: datetime, now: datetime) -> TriggerReceived:
    run_id = scheduled_run_id(flow.tenant_id, flow.id, tick)
    return TriggerReceived(
        trigger_id=run_id.removeprefix("run_sched_"),  # deterministic too: a re-fired tick is the same input
        tenant_id=flow.tenant_id,
        run_id=run_id,
        flow_id=flow.id,
        flow_version=flow.version,  # the version whose schedule produced the tick
        trigger=TriggerInfo(type=TriggerType.SCHEDULE, caller="scheduler", payload={"scheduled_for": tick_iso(tick)}),
        environment=flow.environment,
        execution_mode=ExecutionMode.SCHEDULE,
        received_at=now,
    )


# (tenant, flow, version, the tick) → the cursor window of a syncing flow's run, None for other flows.
Windows = Callable[[str, str, int, datetime], Awaitable[CursorWindow | None]]


class ScaledClock:
    """Schedule time running 1/time_scale times as fast as real time from `origin`: tests see an hour of 1-minute
    ticks in seconds. Schedulers that must agree on ticks share one instance."""

    def __init__(self, origin: datetime, time_scale: float) -> None:
        self.origin = _utc(origin)
        self.time_scale = time_scale
        self._started = time.monotonic()

    def __call__(self) -> datetime:
        return self.origin + timedelta(seconds=(time.monotonic() - self._started) / self.time_scale)


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
                        key, tick = (mark["tenant_id"], mark["flow_id"]), _utc(datetime.fromisoformat(mark["tick"]))
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
                since = [_utc(event.occurred_at)] + [t for t in (self._marked.get(key), entry and entry.settled) if t]
                self._entries[key] = _Entry(flow, schedule, max(since))
        elif isinstance(event, FlowResumed) and entry is not None:
            entry.settle(_utc(event.occurred_at))  # ticks while paused are not missed ones: the next one fires
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
