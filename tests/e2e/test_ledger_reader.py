"""The ledger reader analytics jobs use (services/common/ledger_reader.py, docs/ledger.md) on the real broker:
from the beginning, an offset or a time; filtered; an old-version event upcast; following live in a consumer
group, deduplicated by (run_id, seq) across a restart."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from schemas import events as ev
from schemas import upcasters
from schemas.events import EventBase
from schemas.topics import partition_for
from services.common.ledger_reader import LedgerItem, LedgerReader
from tests.conftest import Sandbox
from tests.factories import run_events
from tests.harness import append_ledger, flow, publish_flows

pytestmark = pytest.mark.integration


def _runs() -> dict[str, list[EventBase]]:
    return {
        "run_a1": run_events("run_a1", tenant_id="acme", flow_id="orders", steps=2),
        "run_a2": run_events("run_a2", tenant_id="acme", flow_id="invoices", steps=1, fail_at=0),
        "run_b1": run_events("run_b1", tenant_id="globex", flow_id="orders", steps=3),
    }


async def _read(sandbox: Sandbox, **options: Any) -> list[LedgerItem]:
    async with LedgerReader(sandbox.infra.kafka_bootstrap, topics=sandbox.topics, **options) as reader:
        return [item async for batch in reader.batches() for item in batch]


def _by_run(items: list[LedgerItem]) -> dict[str, list[EventBase]]:
    out: dict[str, list[EventBase]] = defaultdict(list)
    for item in items:
        assert isinstance(item.event, EventBase)
        out[item.event.run_id].append(item.event)
    return dict(out)


async def test_reads_every_run_from_the_beginning_typed_and_in_seq_order(sandbox: Sandbox) -> None:
    runs = _runs()
    await append_ledger(sandbox, [e for events in runs.values() for e in events])
    got = _by_run(await _read(sandbox))
    assert set(got) == set(runs)
    for run_id, events in runs.items():
        assert [e.seq for e in got[run_id]] == list(range(len(events)))
        assert [type(e) for e in got[run_id]] == [type(e) for e in events]
        assert got[run_id] == events  # the same typed events the executor wrote
    assert isinstance(got["run_a2"][-1], ev.RunFailed)


async def test_filters_by_tenant_flow_and_event_type(sandbox: Sandbox) -> None:
    runs = _runs()
    await append_ledger(sandbox, [e for events in runs.values() for e in events])
    assert set(_by_run(await _read(sandbox, tenant="acme"))) == {"run_a1", "run_a2"}
    assert set(_by_run(await _read(sandbox, flow="orders"))) == {"run_a1", "run_b1"}
    assert set(_by_run(await _read(sandbox, tenant="acme", flow="orders"))) == {"run_a1"}
    ended = await _read(sandbox, types={"RunSucceeded", "RunFailed"})
    assert sorted((type(i.event).__name__, i.event.run_id) for i in ended if isinstance(i.event, EventBase)) == [
        ("RunFailed", "run_a2"), ("RunSucceeded", "run_a1"), ("RunSucceeded", "run_b1"),
    ]  # fmt: skip


async def test_starts_at_an_offset_or_a_time(sandbox: Sandbox) -> None:
    first = run_events("run_old", steps=2)
    await append_ledger(sandbox, first)
    everything = await _read(sandbox)
    part = everything[0].partition
    # From offset 3 of the run's partition: the events from seq 3 on (one run, written in order from offset 0).
    from_three = await _read(sandbox, start={part: 3})
    assert [i.event.seq for i in from_three if isinstance(i.event, EventBase)] == list(range(3, len(first)))
    assert all(i.offset >= 3 for i in from_three)

    await asyncio.sleep(0.2)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.2)
    later = run_events("run_new", steps=1)
    await append_ledger(sandbox, later)
    since_cut = _by_run(await _read(sandbox, start=cut))
    assert set(since_cut) == {"run_new"}
    assert len(since_cut["run_new"]) == len(later)
    assert set(_by_run(await _read(sandbox, start=cut - timedelta(hours=1)))) == {"run_old", "run_new"}
    assert await _read(sandbox, start="end") == []


async def test_flows_topic_events_are_read_with_flows(sandbox: Sandbox) -> None:
    await publish_flows(sandbox, [flow("acme", "orders", [{"name": "s", "action": "transform", "input": {}}])])
    await append_ledger(sandbox, run_events("run_f", tenant_id="acme", flow_id="orders", steps=1))
    items = await _read(sandbox, flows=True)
    published = [i.event for i in items if isinstance(i.event, ev.FlowVersionPublished)]
    assert [(e.tenant_id, e.flow_id, e.flow.name) for e in published] == [("acme", "orders", "Orders")]
    assert {i.topic for i in items} == {sandbox.topics.ledger, sandbox.topics.flows}
    assert not any(isinstance(i.event, ev.FlowVersionPublished) for i in await _read(sandbox))


async def test_an_old_schema_version_is_upcast_by_the_codec(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LogEmitted stored at schema_version 0, whose payload called `message` `text`, is read as today's."""

    def v0_to_v1(data: dict[str, Any]) -> dict[str, Any]:
        payload = dict(data["payload"])
        payload["message"] = payload.pop("text")
        return {**data, "payload": payload, "schema_version": 1}

    monkeypatch.setitem(upcasters.UPCASTERS, ("LogEmitted", 0), v0_to_v1)
    run_id = "run_legacy"
    raw = {
        "type": "LogEmitted", "schema_version": 0, "event_id": uuid.uuid4().hex, "tenant_id": "acme",
        "run_id": run_id, "flow_id": "orders", "flow_version": 1, "seq": 0, "occurred_at": "2025-01-02T03:04:05Z",
        "causation_id": "c0", "correlation_id": run_id, "payload": {"level": "WARNING", "text": "disk almost full"},
    }  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=sandbox.infra.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(sandbox.topics.ledger, orjson.dumps(raw), key=run_id.encode(),
                                     partition=partition_for(run_id, sandbox.partitions))  # fmt: skip
    finally:
        await producer.stop()
    (item,) = await _read(sandbox)
    assert isinstance(item.event, ev.LogEmitted)
    assert item.event.schema_version == 1
    assert (item.event.payload.level, item.event.payload.message) == ("WARNING", "disk almost full")


async def _follow(reader: LedgerReader, count: int, within: float = 30) -> list[EventBase]:
    """Events from a following reader until `count` arrived; each batch is processed before the next is asked
    for, so the one before it is committed."""
    out: list[EventBase] = []

    async def go() -> None:
        async for batch in reader.batches():
            out.extend(i.event for i in batch if isinstance(i.event, EventBase))
            if len(out) >= count:
                return

    await asyncio.wait_for(go(), within)
    return out


async def test_a_live_follower_in_a_group_applies_each_event_once_across_restarts(sandbox: Sandbox) -> None:
    bootstrap, group = sandbox.infra.kafka_bootstrap, f"{sandbox.topics.prefix}.analytics"
    model: dict[str, int] = {}  # the job's read model: the last seq applied per run
    applied: list[tuple[str, int]] = []

    def apply(events: list[EventBase]) -> None:
        for e in events:
            applied.append((e.run_id, e.seq))
            model[e.run_id] = e.seq

    one = run_events("run_one", steps=1)
    await append_ledger(sandbox, one)
    async with LedgerReader(bootstrap, topics=sandbox.topics, follow=True, group_id=group, applied=model) as reader:
        apply(await _follow(reader, len(one)))
        await reader.commit()

    # The log repeats run_one's last event (a redelivered write) and gains run_two.
    two = run_events("run_two", steps=2)
    await append_ledger(sandbox, [one[-1], *two])
    async with LedgerReader(bootstrap, topics=sandbox.topics, follow=True, group_id=group, applied=model) as reader:
        apply(await _follow(reader, len(two)))
        assert reader.stats.duplicates == 1
        # Stopped before committing: the next member of the group is given run_two again.

    async with LedgerReader(bootstrap, topics=sandbox.topics, follow=True, group_id=group, applied=model) as reader:

        async def drain() -> None:
            async for batch in reader.batches():
                apply([i.event for i in batch if isinstance(i.event, EventBase)])

        task = asyncio.create_task(drain())
        try:
            for _ in range(300):
                if reader.stats.read >= len(two) + 1:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # nothing more arrives
        finally:
            task.cancel()
        # What was not committed is delivered again, and every record of it is recognised as applied.
        assert reader.stats.read >= 1, "the uncommitted batch was redelivered"
        assert reader.stats.duplicates == reader.stats.read
        assert reader.stats.yielded == 0

    assert sorted(applied) == sorted([(e.run_id, e.seq) for e in one + two]), "every event applied exactly once"
