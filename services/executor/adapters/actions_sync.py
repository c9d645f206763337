"""`sync_records`: read a window of records from a source, map each, write each to a destination; failures listed.

The runner composes the parts: the input (`services/executor/sync.py`), the mapping and the output
(`sync_mapping.py`), the reading of failures (`sync_errors.py`), and the two kinds of I/O (`sync_http.py`,
`sync_postgres.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from services.common.netguard import guarded_client
from services.executor.adapters.actions_base import StepCall, StepError, parse_input
from services.executor.adapters.actions_db import DatabaseActions
from services.executor.adapters.connectors import ConnectorRegistry, as_registry
from services.executor.adapters.sync_http import HttpEnds
from services.executor.adapters.sync_postgres import PostgresEnds
from services.executor.sync import HttpDestination, HttpSource, SyncRecordsInput
from services.executor.sync_mapping import SAMPLE_SIZE, Progress, prepare


class SyncRecordsActions:
    """Reads the whole window, then writes record by record; the step fails only for what fails every record
    (`adapters/sync_http.py` says which HTTP answers those are). A retried step writes again what it wrote before:
    an upsert is idempotent, and an HTTP write carries the same `Idempotency-Key` on every attempt."""

    def __init__(self, *, connectors: ConnectorRegistry | Mapping[str, str], allow_private: bool, max_output_bytes: int,
                 http: httpx.AsyncClient | None, db: DatabaseActions | None = None) -> None:  # fmt: skip
        self.connectors = as_registry(connectors)
        self.allow_private = allow_private
        self.max_bytes = max_output_bytes
        self._own_http = http is None
        # URLs written in flows go through the guarded client (resolved once, checked, pinned); a connector's
        # own origin through a plain one: the operator configured it, private or not.
        self.http = http or guarded_client(allow_private, follow_redirects=False)
        self.trusted_http = httpx.AsyncClient(follow_redirects=False)
        self._own_db = db is None
        self.db = db or DatabaseActions(connectors=connectors, allow_private=allow_private, max_rows=1,
                                        max_output_bytes=max_output_bytes)  # fmt: skip
        self.over_http = HttpEnds(self.connectors, self.http, self.trusted_http)
        self.over_postgres = PostgresEnds(self.connectors, self.db)

    async def close(self) -> None:
        if self._own_http:
            await self.http.aclose()
        await self.trusted_http.aclose()
        if self._own_db:
            await self.db.close()

    async def sync(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(SyncRecordsInput, call.input, "sync_records")
        run = Progress(spec)
        try:
            with run.timed("read"):
                if isinstance(spec.source, HttpSource):
                    records = await self.over_http.read(spec.source, spec, call)
                else:
                    records = await self.over_postgres.read(spec.source, spec, call)
            with run.timed("transform"):
                prepared = prepare(records, spec, run.tally)
            run.sample = [p.data for p in prepared[:SAMPLE_SIZE]]
            with run.timed("write"):
                if isinstance(spec.destination, HttpDestination):
                    await self.over_http.write(spec.destination, prepared, run, call)
                else:
                    await self.over_postgres.write(spec.destination, prepared, run, call)
        except StepError as exc:
            exc.output = run.output(self.max_bytes)  # what was done before the step failed
            raise
        return run.output(self.max_bytes)
