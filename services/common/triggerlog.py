"""Appends run requests to the triggers topic, keyed (and partitioned) by run_id, through the shared Appenders.

Large batches go through a producer of their own: a producer sends one batch per partition at a time, so a
100,000-input request handed to the producer everyone shares would hold every other tenant's triggers in its queue
for seconds (invariant 8). Small requests keep their own producer, and their latency, whatever the bulk one carries.
"""

from __future__ import annotations

from services.common.appender import Appender

# Requests with more records than this use the bulk producer.
BULK_RECORDS = 1_000


class TriggerLog:
    def __init__(self, appender: Appender, topic: str, bulk: Appender | None = None) -> None:
        self.appender = appender
        self.bulk = bulk or appender
        self.topic = topic

    async def append(self, records: list[tuple[str, bytes]]) -> None:
        """(run id, encoded TriggerReceived) pairs; returns once every one is durable (acks=all), else raises
        AppendFailed naming which are durable, refused and unknown."""
        appender = self.bulk if len(records) > BULK_RECORDS else self.appender
        await appender.append(self.topic, [(run_id.encode(), value, None) for run_id, value in records])
