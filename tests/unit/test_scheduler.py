"""Tick arithmetic and the missed-tick policy of the scheduler, on a fake clock in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import ExecutionMode, TriggerType
from schemas.flows import Environment, FlowDefinition, StepAction, StepDefinition, TriggerConfig
from services.common.schedule import (
    COUNT_CAP,
    Due,
    Schedule,
    ScheduleError,
    Timetable,
    plan,
    scheduled_run_id,
    scheduled_trigger,
    tick_iso,
)

T0 = datetime(2025, 3, 10, 12, 0, 0, tzinfo=UTC)
HOUR = 3600.0


def every(seconds: float) -> Schedule:
    schedule = Schedule.of(TriggerConfig(type="schedule", interval_s=seconds))
    assert schedule is not None
    return schedule


def cron(expression: str) -> Schedule:
    schedule = Schedule.of(TriggerConfig(type="schedule", cron=expression))
    assert schedule is not None
    return schedule


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


# ---------------------------------------------------------------- parsing


def test_only_schedule_triggers_have_a_schedule() -> None:
    assert Schedule.of(TriggerConfig(type="webhook", cron="* * * * *")) is None
    assert Schedule.of(TriggerConfig(type="manual")) is None


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        (TriggerConfig(type="schedule", cron="every morning"), "'every morning' is not a cron expression"),
        (TriggerConfig(type="schedule", cron="61 * * * *"), "'61 * * * *' is not a cron expression"),
        (TriggerConfig(type="schedule", cron="0 0 30 2 *"), "matches no date"),
        (TriggerConfig(type="schedule", cron="* * * * *", interval_s=60), "not both"),
        (TriggerConfig(type="schedule"), "needs `cron` or `interval_s`"),
        (TriggerConfig(type="schedule", interval_s=0.01), "at least 1 s"),
        (TriggerConfig(type="schedule", interval_s=float("nan")), "at least 1 s"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(trigger: TriggerConfig, message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("*", r"\*")):
        Schedule.of(trigger)


# ---------------------------------------------------------------- interval ticks


def test_interval_ticks_sit_on_a_grid_from_the_epoch_whenever_asked() -> None:
    minute = every(60)
    assert minute.next_after(T0 + s(0.5)) == T0 + s(60)
    assert minute.next_after(T0) == T0 + s(60)  # strictly after
    assert minute.latest_at(T0) == T0  # at or before
    assert minute.latest_at(T0 + s(59.999)) == T0
    seven = every(7)  # 7 s does not divide a minute: still the same ticks in every process
    assert seven.latest_at(T0) == datetime(2025, 3, 10, 11, 59, 54, tzinfo=UTC)
    assert seven.next_after(T0) == datetime(2025, 3, 10, 12, 0, 1, tzinfo=UTC)
    half = every(1.5)
    assert half.next_after(T0) == T0 + s(1.5)


def test_interval_ticks_between_two_times_exclude_both_ends() -> None:
    second = every(1)
    assert second.count_between(T0, T0 + s(10)) == 9
    assert second.count_between(T0 + s(0.5), T0 + s(10)) == 9
    assert second.count_between(T0, T0 + s(1)) == 0
    assert second.count_between(T0, T0) == 0
    assert second.count_between(T0, T0 + timedelta(days=365)) == COUNT_CAP


# ---------------------------------------------------------------- cron ticks (UTC)


def test_cron_ticks_in_utc() -> None:
    five = cron("*/5 * * * *")
    assert five.next_after(T0) == T0 + timedelta(minutes=5)
    assert five.next_after(T0 + s(1)) == T0 + timedelta(minutes=5)
    assert five.latest_at(T0) == T0
    assert five.latest_at(T0 - timedelta(microseconds=1)) == T0 - timedelta(minutes=5)
    assert five.latest_at(T0 + timedelta(minutes=4, seconds=59)) == T0
    daily = cron("0 6 * * *")
    assert daily.next_after(T0) == datetime(2025, 3, 11, 6, tzinfo=UTC)
    assert daily.latest_at(T0) == datetime(2025, 3, 10, 6, tzinfo=UTC)
    seconds = cron("* * * * * */10")  # a 6th field counts seconds
    assert seconds.next_after(T0) == T0 + s(10)
    assert seconds.latest_at(T0 + s(25)) == T0 + s(20)


def test_cron_ticks_between_two_times() -> None:
    five = cron("*/5 * * * *")
    assert five.count_between(T0, T0 + timedelta(hours=1)) == 11
    assert five.count_between(T0, T0 + timedelta(minutes=5)) == 0
    assert cron("* * * * * *").count_between(T0, T0 + timedelta(days=1)) == COUNT_CAP


# ---------------------------------------------------------------- the missed-tick policy


def test_a_tick_fires_once_when_it_is_due() -> None:
    minute = every(60)
    assert plan(minute, T0, T0 + s(59), HOUR) is None
    due = plan(minute, T0, T0 + s(60.004), HOUR)
    assert due is not None and (due.fire, due.skipped, due.settled) == (T0 + s(60), 0, T0 + s(60))
    assert plan(minute, due.settled, T0 + s(60.5), HOUR) is None  # settled: not again


def test_after_an_outage_only_the_newest_missed_tick_fires() -> None:
    minute = every(60)
    # Down from 12:00:30 to 12:10:20: ticks 12:01 … 12:10 were missed.
    due = plan(minute, T0, T0 + timedelta(minutes=10, seconds=20), HOUR)
    assert due is not None
    assert due.fire == T0 + timedelta(minutes=10)
    assert due.skipped == 9
    assert due.settled == due.fire


def test_a_daily_job_still_runs_after_a_short_outage() -> None:
    midnight = datetime(2025, 3, 11, tzinfo=UTC)
    daily = cron("0 0 * * *")
    due = plan(daily, midnight - timedelta(days=1), midnight + timedelta(minutes=20), HOUR)
    assert due is not None and due.fire == midnight and due.skipped == 0


def test_a_missed_tick_older_than_the_catch_up_bound_is_skipped_too() -> None:
    midnight = datetime(2025, 3, 11, tzinfo=UTC)
    daily = cron("0 0 * * *")
    due = plan(daily, midnight - timedelta(days=3), midnight + timedelta(hours=2), HOUR)
    assert due is not None
    assert due.fire is None
    assert due.skipped == 3  # the 9th, 10th and 11th
    assert due.settled == midnight  # and the next one to fire is the 12th
    assert daily.next_after(due.settled) == midnight + timedelta(days=1)


def test_a_fake_clock_stepping_through_ten_seconds_fires_each_one_second_tick_once() -> None:
    second = every(1)
    settled = T0 + s(0.1)
    now = settled
    fired: list[datetime] = []
    while now < T0 + s(10.5):
        now += s(0.25)
        due = plan(second, settled, now, HOUR)
        if due is not None:
            assert due.skipped == 0
            assert due.fire is not None
            fired.append(due.fire)
            settled = due.settled
    assert fired == [T0 + s(i) for i in range(1, 11)]


# ---------------------------------------------------------------- run ids and triggers


def test_run_ids_are_the_same_in_every_process_and_differ_per_tenant_flow_and_tick() -> None:
    run = scheduled_run_id("t1", "nightly", T0)
    assert run == scheduled_run_id("t1", "nightly", T0.astimezone())  # the same instant in another zone
    assert run.startswith("run_sched_") and len(run) == len("run_sched_") + 32
    others = {
        scheduled_run_id("t2", "nightly", T0),
        scheduled_run_id("t1", "hourly", T0),
        scheduled_run_id("t1", "nightly", T0 + s(1)),
    }
    assert run not in others and len(others) == 3


def test_a_tick_becomes_a_schedule_trigger_with_the_time_it_was_due() -> None:
    flow = FlowDefinition(
        id="nightly", tenant_id="t1", name="Nightly", version=3, environment=Environment.TESTING,
        trigger=TriggerConfig(type="schedule", cron="0 0 * * *"),
        steps=(StepDefinition(name="a", action=StepAction.TRANSFORM),),
    )  # fmt: skip
    trigger = scheduled_trigger(flow, T0, T0 + s(0.01))
    assert trigger.run_id == scheduled_run_id("t1", "nightly", T0)
    assert trigger.trigger.type is TriggerType.SCHEDULE
    assert trigger.execution_mode is ExecutionMode.SCHEDULE
    assert trigger.environment is Environment.TESTING
    assert trigger.flow_version == 3
    assert trigger.trigger.payload == {"scheduled_for": "2025-03-10T12:00:00Z"}
    assert tick_iso(T0 + timedelta(microseconds=250)) == "2025-03-10T12:00:00.000250Z"
    assert scheduled_trigger(flow, T0, T0 + s(5)).trigger_id == trigger.trigger_id


# ---------------------------------------------------------------- the timetable of scheduled flows


def every_minute(version: int = 1) -> FlowDefinition:
    return FlowDefinition(
        id="minutely", tenant_id="t1", name="Minutely", version=version, environment=Environment.TESTING,
        trigger=TriggerConfig(type="schedule", interval_s=60),
        steps=(StepDefinition(name="a", action=StepAction.TRANSFORM),),
    )  # fmt: skip


KEY = ("t1", "minutely")


def test_a_published_schedule_fires_from_its_next_tick_and_a_settled_tick_is_not_fired_again() -> None:
    table = Timetable()
    table.published(KEY, every_minute(), every(60), T0 + s(10), marked=None)
    assert table.due(T0 + s(59), set(), HOUR) == []  # the tick at T0 came before the publication
    [(key, entry, due)] = table.due(T0 + s(61), set(), HOUR)
    assert key == KEY and entry.flow.version == 1 and due == Due(T0 + s(60), 0, T0 + s(60))
    table.settle(KEY, due.settled)
    assert table.due(T0 + s(61), set(), HOUR) == []


def test_a_tick_settled_before_a_restart_or_a_new_version_is_not_fired_again() -> None:
    table = Timetable()
    table.published(KEY, every_minute(), every(60), T0 - s(3600), marked=T0 + s(60))  # settled by a past process
    assert table.due(T0 + s(61), set(), HOUR) == []
    table.settle(KEY, T0 + s(120))
    table.published(KEY, every_minute(2), every(60), T0 + s(90), marked=None)  # published before the settled tick
    [(_, entry, due)] = table.due(T0 + s(181), set(), HOUR)
    assert entry.flow.version == 2 and due.fire == T0 + s(180)


def test_a_paused_flow_fires_nothing_and_a_resumed_one_fires_from_the_next_tick_not_the_missed_ones() -> None:
    table = Timetable()
    table.published(KEY, every_minute(), every(60), T0, marked=None)
    assert table.due(T0 + s(300), {KEY}, HOUR) == []
    table.resumed(KEY, T0 + s(330))
    assert table.due(T0 + s(359), set(), HOUR) == []
    assert [due.fire for _, _, due in table.due(T0 + s(361), set(), HOUR)] == [T0 + s(360)]


def test_a_flow_without_a_schedule_leaves_the_timetable_and_the_sleep_is_bounded_by_the_next_tick() -> None:
    table = Timetable()
    table.published(KEY, every_minute(), every(60), T0, marked=None)
    assert table.sleep_s(T0 + s(50), set(), poll_s=30, time_scale=1.0) == 10
    assert table.sleep_s(T0 + s(50), set(), poll_s=30, time_scale=0.01) == pytest.approx(0.1)  # scaled to real time
    assert table.sleep_s(T0 + s(50), {KEY}, poll_s=30, time_scale=1.0) == 30  # paused: only the poll
    table.published(KEY, every_minute(2), None, T0 + s(55), marked=None)
    assert len(table) == 0 and table.due(T0 + s(600), set(), HOUR) == []
