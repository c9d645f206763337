"""Appends run requests to the triggers topic, keyed (and partitioned) by run_id, through the shared Appender."""

from __future__ import annotations

from services.common.appender import Appender


class TriggerLog:
    def __init__(self, appender: Appender, topic: str) -> None:
        self.appender = appender
        self.topic = topic

    async def append(self, records: list[tuple[str, bytes]]) -> None:
        """(run id, encoded TriggerReceived) pairs; returns once every one is durable (acks=all), else raises
        AppendFailed naming which are durable, refused and unknown."""
        await self.appender.append(self.topic, [(run_id.encode(), value, None) for run_id, value in records])
