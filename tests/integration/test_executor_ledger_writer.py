"""The ledger writer on the real broker: what many runs append at once lands on each partition in the order it was
appended, byte for byte as encoded (more than fit in one producer batch too), every future it returned resolves
once its events are durable, and a flush returns while a partition is still being written to."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from schemas import codec
from schemas.events import EventBase
from schemas.topics import partition_for
from services.common import kafka
from services.executor.adapters.ledger import LedgerWriter, encode_event
from tests.conftest import Infra, make_sandbox
from tests.factories import run_events


async def _records(infra: Infra, topic: str, partition: int) -> list[bytes]:
    out: list[bytes] = []
    async for batch in kafka.read_to_end(infra.kafka_bootstrap, topic, partition):
        out += [r.value for r in batch if r.value is not None]
    return out


async def test_appends_land_in_order_byte_for_byte_and_resolve_once_durable(infra: Infra) -> None:
    async with make_sandbox(infra, partitions=2) as sandbox:
        writer = LedgerWriter(infra.kafka_bootstrap, sandbox.topics.ledger, linger_ms=0)
        await writer.start()
        try:
            # 60 runs decided at once, each run's events appended a few at a time as decisions are; one run's step
            # outputs are large, so its partition needs more than one 256 KB batch while the others wait.
            runs = [run_events(f"run-{i:03d}", steps=4) for i in range(60)]
            big = [e.model_copy(update={"payload": e.payload.model_copy(update={"output": {"blob": "x" * 90_000}})})
                   if e.type == "StepSucceeded" else e for e in run_events("run-big", steps=6)]  # fmt: skip
            runs.append(big)
            expected: dict[int, list[bytes]] = {0: [], 1: []}
            futures: list[asyncio.Future[object]] = []

            async def decide(events: list[EventBase]) -> None:
                partition = partition_for(events[0].run_id, 2)
                for i in range(0, len(events), 3):
                    chunk = events[i : i + 3]
                    expected[partition] += [encode_event(e) for e in chunk]
                    futures.extend(await writer.append(partition, chunk))
                    await asyncio.sleep(0)  # other runs decide in between, as run loops do

            await asyncio.gather(*(decide(events) for events in runs))
            results: list[Any] = await asyncio.wait_for(asyncio.gather(*futures), 30)
            assert all(f.done() and f.exception() is None for f in futures) and len(results) == len(futures)
            await writer.flush()
        finally:
            await writer.stop()
        for partition in (0, 1):
            records = await _records(infra, sandbox.topics.ledger, partition)
            assert records == expected[partition]
        everything = [codec.decode_ledger_event(r) for p in (0, 1) for r in expected[p]]
        assert len(everything) == sum(len(r) for r in runs)
        assert sum(len(r) > 90_000 for r in expected[partition_for("run-big", 2)]) == 6


async def test_flush_waits_for_what_was_appended_before_it_not_for_a_partition_that_stays_busy(infra: Infra) -> None:
    async with make_sandbox(infra, partitions=1) as sandbox:
        writer = LedgerWriter(infra.kafka_bootstrap, sandbox.topics.ledger, linger_ms=0)
        await writer.start()
        busy = True

        async def keep_appending() -> None:
            i = 0
            until = time.monotonic() + 30  # bounded, so a flush that never returns fails the test instead of hanging it
            while busy and time.monotonic() < until:
                await writer.append(0, run_events(f"run-busy-{i:05d}", steps=1))
                i += 1
                await asyncio.sleep(0)  # every loop pass: a batch is always waiting when one is acknowledged

        first = await writer.append(0, run_events("run-first", steps=2))
        appender = asyncio.create_task(keep_appending())
        try:
            await asyncio.sleep(0.05)
            await asyncio.wait_for(writer.flush(), 10)  # returns while the partition is still being written to
            assert all(f.done() and f.exception() is None for f in first)
        finally:
            busy = False
            await asyncio.wait_for(appender, 40)
            await asyncio.wait_for(writer.stop(), 60)
        records = await _records(infra, sandbox.topics.ledger, 0)
        first_run, busy_runs = len(run_events("x", steps=2)), len(run_events("x", steps=1))
        assert [codec.decode_ledger_event(r).run_id for r in records[:first_run]] == ["run-first"] * first_run
        later = [codec.decode_ledger_event(r).run_id for r in records[first_run:]]
        assert later and len(later) == busy_runs * len(set(later))  # every busy run whole, none lost at stop
