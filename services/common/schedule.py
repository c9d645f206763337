"""Schedule arithmetic (pure): the ticks of a cron or interval flow, which missed ones fire, and a tick's run.

Ticks are computed in UTC: a cron expression (croniter: 5 fields, or a 6th for seconds), or `interval_s` on a grid
counted from the Unix epoch, so every process computes the same ticks whenever it started. Missed ticks: of the ticks
since the last settled one only the newest fires, and only while it is at most `max_catch_up_s` old. A tick's run id
is `run_sched_<uuid5(tenant, flow, tick)>`, so two schedulers firing one tick name one run. `Timetable` keeps each
scheduled flow's schedule and newest settled tick. Used by ingest's scheduler (services/ingest/scheduler.py, the Kafka
I/O around this) and by the flows API to check a schedule when a version is published.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from croniter import CroniterBadDateError, croniter

from schemas.events import CursorWindow, ExecutionMode, TriggerInfo, TriggerReceived, TriggerType
from schemas.flows import FlowDefinition, TriggerConfig

if TYPE_CHECKING:
    from services.common.flowfollow import FlowKey

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_INTERVAL_S = 1.0
# Counting the missed ticks of a per-second cron over months would stall the loop: beyond this, "at least".
COUNT_CAP = 10_000
_RUN_NS = uuid.UUID("e1acf6a7-abb3-4f88-a3ef-16abc34d858d")

Clock = Callable[[], datetime]


class ScheduleError(ValueError):
    """A schedule trigger that cannot run; the message says why, for the operator reading the log."""


def as_utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _micros(t: datetime) -> int:
    d = as_utc(t) - EPOCH
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
            return as_utc(croniter(self.cron, as_utc(t)).get_next(datetime))
        except CroniterBadDateError:
            return None

    def latest_at(self, t: datetime) -> datetime | None:
        """The last tick at or before `t`."""
        if self.cron is None:
            return _at(_micros(t) // self.interval_us * self.interval_us)
        t = as_utc(t)
        if self.next_after(t - timedelta(microseconds=1)) == t:
            return t
        try:
            return as_utc(croniter(self.cron, t).get_prev(datetime))
        except CroniterBadDateError:
            return None

    def count_between(self, after: datetime, before: datetime) -> int:
        """How many ticks lie strictly between the two times (at most COUNT_CAP)."""
        if self.cron is None:
            first = _micros(after) // self.interval_us + 1
            last = -(-_micros(before) // self.interval_us) - 1
            return max(0, min(last - first + 1, COUNT_CAP))
        ticks = croniter(self.cron, as_utc(after))
        count = 0
        try:
            while count < COUNT_CAP and as_utc(ticks.get_next(datetime)) < before:
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
    return as_utc(tick).isoformat().replace("+00:00", "Z")


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


Planned = tuple["FlowKey", "Entry", Due]


@dataclass
class Entry:
    """A scheduled flow: its latest version, that version's schedule and the newest tick settled."""

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


class Timetable:
    """Every scheduled flow's entry, changed by the flows topic's events and by the scheduler's passes."""

    def __init__(self) -> None:
        self.entries: dict[FlowKey, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def published(self, key: FlowKey, flow: FlowDefinition, schedule: Schedule | None, at: datetime,
                  marked: datetime | None) -> None:  # fmt: skip
        """The flow's latest version, published `at`; `marked` is its newest tick settled before this process."""
        entry = self.entries.get(key)
        if schedule is None:
            self.entries.pop(key, None)
            return
        # A new version's schedule applies from its publication: its first tick is the next one after.
        since = [as_utc(at)] + [t for t in (marked, entry and entry.settled) if t]
        self.entries[key] = Entry(flow, schedule, max(since))

    def resumed(self, key: FlowKey, at: datetime) -> None:
        """Ticks while the flow was paused are not missed ones: the next one fires."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.settle(as_utc(at))

    def due(self, now: datetime, paused: Collection[FlowKey], max_catch_up_s: float) -> list[Planned]:
        """What a pass at `now` does about each active flow with a tick due (`plan`'s missed-tick policy)."""
        dues = []
        for key, entry in self.entries.items():
            if key in paused or entry.next_due is None or now < entry.next_due:
                continue
            due = plan(entry.schedule, entry.settled, now, max_catch_up_s)
            if due is not None:
                dues.append((key, entry, due))
        return dues

    def settle(self, key: FlowKey, t: datetime) -> None:
        entry = self.entries.get(key)  # maybe a new version's, published meanwhile
        if entry is not None:
            entry.settle(t)

    def sleep_s(self, now: datetime, paused: Collection[FlowKey], poll_s: float, time_scale: float) -> float:
        """Real seconds until the next tick of an active flow, at most `poll_s` (clocks jump; flows change);
        `time_scale` converts schedule seconds into real ones."""
        dues = [e.next_due for k, e in self.entries.items() if e.next_due is not None and k not in paused]
        if not dues:
            return poll_s
        return min(poll_s, max(0.0, (min(dues) - now).total_seconds() * time_scale))


# (tenant, flow, version, the tick) → the cursor window of a syncing flow's run, None for other flows.
Windows = Callable[[str, str, int, datetime], Awaitable[CursorWindow | None]]


class ScaledClock:
    """Schedule time running 1/time_scale times as fast as real time from `origin`: tests see an hour of 1-minute
    ticks in seconds. Schedulers that must agree on ticks share one instance."""

    def __init__(self, origin: datetime, time_scale: float) -> None:
        self.origin = as_utc(origin)
        self.time_scale = time_scale
        self._started = time.monotonic()

    def __call__(self) -> datetime:
        return self.origin + timedelta(seconds=(time.monotonic() - self._started) / self.time_scale)
