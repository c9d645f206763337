"""Scheduled flows on the real broker: one trigger per tick with deterministic run ids, two schedulers that
agree, pause and resume, a new version's schedule, one catch-up tick after a restart, a bad cron, and the
ingest app starting its scheduler."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import REGISTRY

from schemas import codec
from schemas.events import ExecutionMode, FlowPaused, FlowResumed, FlowVersionPublished, TriggerReceived, TriggerType
from schemas.flows import Environment, FlowDefinition, StepDefinition, TriggerConfig
from services.common.appender import Appender
from services.common.db import create_pool
from services.common.kafka import publish_flow_events
from services.common.schedule import ScaledClock, Windows, scheduled_run_id
from services.common.triggerlog import TriggerLog
from services.common.windows import cursor_window
from services.ingest.app import create_app
from services.ingest.scheduler import Scheduler, SchedulerTiming
from services.ingest.settings import IngestSettings
from tests.conftest import Sandbox
from tests.harness import wait_until

T0 = datetime(2030, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC)  # half a second past a whole-second tick


def at(second: float) -> datetime:
    """The whole-second tick `second` seconds after T0's."""
    return T0.replace(microsecond=0) + timedelta(seconds=second)


@dataclass
class FakeClock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class TriggerReader:
    """Everything on the triggers topic, read to its current end on each call."""

    sandbox: Sandbox
    seen: list[TriggerReceived] = field(default_factory=list)
    _consumer: AIOKafkaConsumer | None = None

    async def read(self) -> list[TriggerReceived]:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.sandbox.infra.kafka_bootstrap, group_id=None, enable_auto_commit=False
            )
            await self._consumer.start()
            tps = [TopicPartition(self.sandbox.topics.triggers, p) for p in range(self.sandbox.partitions)]
            self._consumer.assign(tps)
            await self._consumer.seek_to_beginning(*tps)
        consumer = self._consumer
        tps = list(consumer.assignment())
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(*tps, timeout_ms=200)).values():
                self.seen.extend(codec.decode_trigger(r.value) for r in records)
        return list(self.seen)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


@pytest.fixture
async def triggers(sandbox: Sandbox) -> AsyncIterator[TriggerReader]:
    reader = TriggerReader(sandbox)
    yield reader
    await reader.close()


@asynccontextmanager
async def scheduler(
    sandbox: Sandbox, clock: Callable[[], datetime], windows: Windows | None = None, **timing: Any
) -> AsyncIterator[Scheduler]:
    appender = Appender(sandbox.infra.kafka_bootstrap, linger_ms=0)
    await appender.start()
    log = TriggerLog(appender, sandbox.topics.triggers)
    timing.setdefault("poll_s", 0.02)
    running = Scheduler(
        sandbox.infra.kafka_bootstrap,
        sandbox.topics,
        log,
        timing=SchedulerTiming(clock=clock, **timing),
        windows=windows,
    )
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
        await appender.stop()


def flow(flow_id: str = "every-second", version: int = 1, **trigger: Any) -> FlowDefinition:
    return FlowDefinition(
        id=flow_id, tenant_id="t1", name=flow_id, version=version, environment=Environment.TESTING,
        trigger=TriggerConfig(type="schedule", **(trigger or {"interval_s": 1})),
        steps=(StepDefinition(name="a", action="transform"),),
    )  # fmt: skip


async def publish(sandbox: Sandbox, *events: Any) -> None:
    await publish_flow_events(sandbox.infra.kafka_bootstrap, sandbox.topics, list(events))


def published(f: FlowDefinition, when: datetime) -> FlowVersionPublished:
    return FlowVersionPublished(tenant_id=f.tenant_id, flow_id=f.id, flow_version=f.version, flow=f, occurred_at=when)


async def passed(running: Scheduler, clock: FakeClock) -> None:
    """Until the scheduler has finished a pass at the clock's current time (its triggers are then durable)."""

    async def check() -> bool:
        return running.observed is not None and running.observed >= clock.now

    await wait_until(check, within=20, what="a pass at the clock's time", every=0.02)


async def step(running: Scheduler, clock: FakeClock, seconds: float = 1) -> None:
    clock.advance(seconds)
    await passed(running, clock)


def ticks(found: list[TriggerReceived]) -> list[str]:
    return sorted(t.trigger.payload["scheduled_for"] for t in found)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def skipped_total() -> float:
    return REGISTRY.get_sample_value("flowtrail_ingest_schedule_skipped_ticks_total") or 0.0


async def test_an_interval_flow_fires_one_trigger_per_tick_with_distinct_deterministic_ids(
    sandbox: Sandbox, triggers: TriggerReader
) -> None:
    # Schedule time runs twice as fast as real time: a 1 s interval ticks every 0.5 s.
    clock = ScaledClock(datetime.now(UTC), time_scale=0.5)
    await publish(sandbox, published(flow(), clock()))
    async with scheduler(sandbox, clock, time_scale=0.5):

        async def four() -> bool:
            return len(await triggers.read()) >= 4

        await wait_until(four)
    found = await triggers.read()
    run_ids = [t.run_id for t in found]
    assert len(set(run_ids)) == len(run_ids)  # one trigger per tick, none twice
    times = [datetime.fromisoformat(t.trigger.payload["scheduled_for"]) for t in found]
    assert len(set(times)) == len(times) and all(t.microsecond == 0 for t in times)  # on the whole-second grid
    for t in found:
        tick = datetime.fromisoformat(t.trigger.payload["scheduled_for"])
        assert t.run_id == scheduled_run_id("t1", "every-second", tick)
        assert t.trigger.type is TriggerType.SCHEDULE and t.execution_mode is ExecutionMode.SCHEDULE
        assert t.environment is Environment.TESTING and t.flow_id == "every-second" and t.flow_version == 1


async def test_two_schedulers_fire_the_same_run_id_for_each_tick(sandbox: Sandbox, triggers: TriggerReader) -> None:
    clock = FakeClock()
    await publish(sandbox, published(flow(), clock()))
    async with scheduler(sandbox, clock) as one, scheduler(sandbox, clock) as two:
        for _ in range(3):
            clock.advance(1)
            await passed(one, clock)
            await passed(two, clock)
    found = await triggers.read()
    expected = {scheduled_run_id("t1", "every-second", at(s)) for s in (1, 2, 3)}
    assert {t.run_id for t in found} == expected
    # A tick appended by both is the same run id twice: the executor starts it once.
    assert set(Counter(t.run_id for t in found).values()) <= {1, 2}
    assert sorted(set(ticks(found))) == [iso(at(s)) for s in (1, 2, 3)]


async def test_a_paused_flow_fires_nothing_and_a_resumed_one_fires_from_the_next_tick(
    sandbox: Sandbox, triggers: TriggerReader
) -> None:
    clock = FakeClock()
    f = flow()
    await publish(sandbox, published(f, clock()))
    async with scheduler(sandbox, clock) as running:
        await step(running, clock)
        assert ticks(await triggers.read()) == [iso(at(1))]

        await publish(sandbox, FlowPaused(tenant_id="t1", flow_id=f.id, flow_version=1, occurred_at=clock.now))
        await running.flows.catch_up()
        for _ in range(3):
            await step(running, clock)
        assert ticks(await triggers.read()) == [iso(at(1))]  # 2, 3 and 4 passed while paused

        await publish(sandbox, FlowResumed(tenant_id="t1", flow_id=f.id, flow_version=1, occurred_at=clock.now))
        await running.flows.catch_up()
        await step(running, clock, 0.1)
        assert ticks(await triggers.read()) == [iso(at(1))]  # the paused ticks are not caught up
        await step(running, clock, 0.9)
        assert ticks(await triggers.read()) == [iso(at(1)), iso(at(5))]


async def test_a_new_versions_schedule_applies_from_the_next_tick(sandbox: Sandbox, triggers: TriggerReader) -> None:
    clock = FakeClock()
    await publish(sandbox, published(flow(), clock()))
    async with scheduler(sandbox, clock) as running:
        await step(running, clock)
        await publish(sandbox, published(flow(version=2, interval_s=5), clock()))  # every 5 s from 00:00:01.5
        await running.flows.catch_up()
        for _ in range(3):
            await step(running, clock)
        assert ticks(await triggers.read()) == [iso(at(1))]
        await step(running, clock)
    found = await triggers.read()
    assert [(t.trigger.payload["scheduled_for"], t.flow_version) for t in found] == [(iso(at(1)), 1), (iso(at(5)), 2)]


async def test_a_restart_after_a_gap_fires_exactly_one_catch_up_tick(sandbox: Sandbox, triggers: TriggerReader) -> None:
    clock = FakeClock()
    await publish(sandbox, published(flow(interval_s=10), clock()))
    async with scheduler(sandbox, clock, max_catch_up_s=30) as running:
        await step(running, clock, 10)
        await step(running, clock, 10)
    assert ticks(await triggers.read()) == [iso(at(10)), iso(at(20))]

    clock.advance(100)  # down for 100 s: ticks 30 … 120 missed
    before = skipped_total()
    async with scheduler(sandbox, clock, max_catch_up_s=30) as running:
        await passed(running, clock)
        assert ticks(await triggers.read()) == [iso(at(10)), iso(at(20)), iso(at(120))]
        assert skipped_total() - before == 9  # 30 … 110
        await step(running, clock, 10)
        assert ticks(await triggers.read())[-1] == iso(at(130))

    clock.advance(97)  # down until 7.5 s past tick 220: older than max_catch_up_s, so nothing catches up
    before = skipped_total()
    async with scheduler(sandbox, clock, max_catch_up_s=5) as running:
        await passed(running, clock)
        assert ticks(await triggers.read())[-1] == iso(at(130))
        assert skipped_total() - before == 9  # 140 … 220
        await step(running, clock, 3)
    assert ticks(await triggers.read()) == [iso(at(s)) for s in (10, 20, 120, 130, 230)]
    assert len({t.run_id for t in await triggers.read()}) == 5


async def test_a_bad_cron_is_logged_and_fires_nothing_while_a_good_one_fires(
    sandbox: Sandbox, triggers: TriggerReader, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    bad, good = flow("bad-cron", cron="every morning"), flow("good-cron", cron="* * * * * */2")
    await publish(sandbox, published(bad, clock()), published(good, clock()))
    with caplog.at_level(logging.ERROR, logger="services.ingest.scheduler"):
        async with scheduler(sandbox, clock) as running:
            for _ in range(4):
                await step(running, clock)
    assert "flow t1/bad-cron version 1: schedule not started: 'every morning' is not a cron expression" in caplog.text
    found = await triggers.read()
    assert {t.flow_id for t in found} == {"good-cron"}
    assert ticks(found) == [iso(at(2)), iso(at(4))]  # every 2 s, in UTC


async def test_the_ingest_app_runs_the_scheduler_unless_it_is_turned_off(
    sandbox: Sandbox, triggers: TriggerReader
) -> None:
    await publish(sandbox, published(flow(), datetime.now(UTC)))
    env = {"kafka_bootstrap": sandbox.infra.kafka_bootstrap, "database_url": sandbox.infra.database_url,
           "database_schema": sandbox.schema, "topic_prefix": sandbox.topics.prefix,
           "scheduler_poll_s": 0.05}  # fmt: skip
    off = create_app(IngestSettings(**env, scheduler=False))
    async with off.router.lifespan_context(off):
        assert off.state.scheduler is None
    app = create_app(IngestSettings(**env))
    async with app.router.lifespan_context(app):

        async def two() -> bool:
            return len(await triggers.read()) >= 2

        await wait_until(two)
    found = await triggers.read()
    assert len({t.run_id for t in found}) == len(found) and {t.flow_id for t in found} == {"every-second"}


async def test_a_scheduled_sync_flow_reads_from_where_its_last_successful_run_ended_up_to_the_tick(
    sandbox: Sandbox, triggers: TriggerReader
) -> None:
    syncing = FlowDefinition(
        id="orders-sync", tenant_id="t1", name="Orders sync", version=1, trigger=TriggerConfig(type="schedule",
        interval_s=1), steps=(StepDefinition(name="sync", action="sync_records", input={"source": {}}),),
    )  # fmt: skip
    last_end = datetime(2029, 12, 31, 23, 0, tzinfo=UTC)
    pool = await create_pool(sandbox.infra.database_url, sandbox.schema)
    try:
        # The read models as the projector leaves them: the version, and a successful run with its window.
        await pool.execute("INSERT INTO flow_versions (tenant_id, flow_id, version, definition, published_at) "
                           "VALUES ('t1', 'orders-sync', 1, $1, now())", syncing.model_dump(mode="json"))  # fmt: skip
        await pool.execute(
            "INSERT INTO runs (id, tenant_id, flow_id, flow_version, status, environment, execution_mode, trigger_type,"
            " created_at, updated_at, last_seq, cursor_window) VALUES ('r0', 't1', 'orders-sync', 1, 'SUCCEEDED', "
            "'PRODUCTION', 'schedule', 'schedule', now(), now(), 9, $1)",
            {"updated_since": None, "updated_until": last_end.isoformat()},
        )
        clock = FakeClock()
        await publish(sandbox, published(syncing, T0 - timedelta(seconds=5)), published(flow(), T0))
        async with scheduler(sandbox, clock, windows=functools.partial(cursor_window, pool)) as running:
            await passed(running, clock)
            clock.advance(1)
            await passed(running, clock)
    finally:
        await pool.close()
    found = {t.flow_id: t for t in await triggers.read()}
    window = found["orders-sync"].cursor_window
    assert window is not None and window.updated_since == last_end
    assert window.updated_until == datetime.fromisoformat(found["orders-sync"].trigger.payload["scheduled_for"])
    assert found["every-second"].cursor_window is None  # a flow that does not sync has no window
