"""Wakes live streams when the projector commits: one LISTEN connection per API process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

CHANNEL = "flowtrail_projected"
log = logging.getLogger(__name__)


class Notifier:
    """The projector sends NOTIFY flowtrail_projected '<schema>' in each batch transaction; a stream waits
    here between reads instead of polling. A lost connection only delays streams to their next timeout."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self._changed = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    async def start(self) -> None:
        try:
            self._conn = await asyncpg.connect(self.dsn)
            await self._conn.add_listener(CHANNEL, self._on_notify)
        except (OSError, asyncpg.PostgresError):
            log.warning("live streams fall back to polling: cannot LISTEN on %s", CHANNEL, exc_info=True)

    async def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await self._conn.close()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == self.schema:
            # Wake everyone waiting now; the next wait starts with a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        """Returns when the projector committed something in our schema, or after `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
