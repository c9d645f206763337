"""The executor's input batches: everything that arrived, as soon as anything has.

faust's `Stream.take_events(max_, within)` waits for `within` before it yields a batch that is not full, and takes
nothing in while its batch is being handled, so every input waited up to the window even on an idle executor, and a
busy one paid the window once per batch on top of the time the batch took (docs/decisions.md, "Input batches without
a window"). `take_ready` yields the inputs buffered so far the moment there is one, and keeps buffering (up to `max_`)
while the caller handles the previous batch: idle, an input is decided at once; busy, a batch is whatever arrived
during the last one, so batches grow with the load instead of the latency.

Events are acked, in order, only once what they caused is durable (invariant 3): the caller adds the futures of the
records it queued to `Taken.durable`, and goes on to the next batch while they are on their way. Deciding batch
n + 1 while batch n is being written is safe for the same reason a run's own loop does not wait for its events:
the producer keeps each partition's records in order and a failed append ends the process
(services/executor/adapters/ledger.py), so no decision outlives the ledger's refusal of what it built on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import EventT

# Batches whose records may still be on their way at once; past this the next batch waits for the oldest.
MAX_IN_FLIGHT = 8


@dataclass
class Taken:
    """A batch of stream events and the futures of the ledger records they caused (their acks wait for these)."""

    events: list[EventT]
    durable: list[asyncio.Future[object]] = field(default_factory=list)


async def take_ready(stream: faust.StreamT[Any], max_: int) -> AsyncIterator[Taken]:
    # The same stream hooks take_events uses (faust's own API for batching consumers): a processor fills the buffer
    # while the stream is drained in the background, and acks are left to this function.
    buffer: list[EventT] = []
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()
    s: Any = stream  # faust's StreamT protocol lacks the hooks Stream has (as for take_events in agents.py)

    async def add(value: Any) -> Any:
        while len(buffer) >= max_:  # the caller is behind: hold the stream (and so the fetches) until it takes these
            room.clear()
            if (await s.wait(room)).stopped:
                return value
        event = s.current_event
        if event is None:
            raise RuntimeError("take_ready found no current event")
        buffer.append(event)
        arrived.set()
        return value

    acks: deque[asyncio.Task[None]] = deque()  # one per batch in flight, each acking after the one before it

    async def ack_when_durable(taken: Taken, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await before
        if taken.durable:
            await asyncio.gather(*taken.durable)
        for event in taken.events:
            await s.ack(event)

    enable_acks = s.enable_acks
    s.enable_acks = False
    s.add_processor(add)
    s._enable_passive(s.channel.__aiter__())
    try:
        while not s.should_stop:
            if (await s.wait(arrived)).stopped:
                break
            taken = Taken(buffer[:])
            buffer.clear()
            arrived.clear()
            room.set()
            if not taken.events:
                continue
            try:
                yield taken
            finally:
                while acks and acks[0].done():
                    acks.popleft().result()  # a failed ack is a stream error: raise it here
                acks.append(asyncio.create_task(ack_when_durable(taken, acks[-1] if acks else None)))
                if len(acks) > MAX_IN_FLIGHT:
                    await acks[0]
    finally:
        s.enable_acks = enable_acks
        s._processors.remove(add)
