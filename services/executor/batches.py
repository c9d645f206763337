"""The executor's input batches: everything that arrived, as soon as anything has.

faust's `Stream.take_events(max_, within)` waits for `within` before it yields a batch that is not full, and takes
nothing in while its batch is being handled, so every input waited up to the window even on an idle executor, and a
busy one paid the window once per batch on top of the time the batch took (docs/decisions.md, "Input batches without
a window"). `take_ready` yields the inputs buffered so far the moment there is one, and keeps buffering (up to `max_`)
while the caller handles the previous batch: idle, an input is decided at once; busy, a batch is whatever arrived
during the last one, so batches grow with the load instead of the latency.

Events are acked, in order, only after the caller's body for their batch returned: their offsets commit once what
they caused is durable (invariant 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.types import EventT


async def take_ready(stream: faust.StreamT[Any], max_: int) -> AsyncIterator[list[EventT]]:
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

    enable_acks = s.enable_acks
    s.enable_acks = False
    s.add_processor(add)
    s._enable_passive(s.channel.__aiter__())
    try:
        while not s.should_stop:
            if (await s.wait(arrived)).stopped:
                break
            batch = buffer[:]
            buffer.clear()
            arrived.clear()
            room.set()
            if not batch:
                continue
            try:
                yield batch
            finally:
                for event in batch:
                    await s.ack(event)
    finally:
        s.enable_acks = enable_acks
        s._processors.remove(add)
