"""The files `flowtrail export` writes (docs/ledger.md#export): runs, steps, attempts and events as Parquet or JSON
Lines, a row group at a time.

Events are read with the ledger reader (services/common/ledger_reader.py) and folded per run by the projector's
pure fold (services/common/runfold); rows are written as they come, so memory holds only the runs still open, not
the history. pyarrow is imported here only, so the `flowtrail` command starts without it (deploy/launcher/
export_cmd.py imports this module when an export runs).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import events as ev
from schemas.events import TERMINAL_EVENTS, EventBase
from schemas.topics import Topics
from services.common.ledger_reader import LedgerReader
from services.common.runfold.details import plan_details
from services.common.runfold.rows import plan

TS = pa.timestamp("us", tz="UTC")
JSON = pa.string()  # nested values (inputs, outputs, errors, payloads) as JSON text: DuckDB's json functions read it
JSON_COLUMNS = frozenset({"payload", "input", "output", "error"})

SCHEMAS: dict[str, pa.Schema] = {
    "events": pa.schema([
        ("event_id", pa.string()), ("type", pa.string()), ("schema_version", pa.int32()), ("tenant_id", pa.string()),
        ("run_id", pa.string()), ("flow_id", pa.string()), ("flow_version", pa.int32()), ("seq", pa.int64()),
        ("occurred_at", TS), ("causation_id", pa.string()), ("correlation_id", pa.string()), ("payload", JSON),
        ("partition", pa.int32()), ("offset", pa.int64()),
    ]),
    "runs": pa.schema([
        ("id", pa.string()), ("tenant_id", pa.string()), ("flow_id", pa.string()), ("flow_version", pa.int32()),
        ("flow_name", pa.string()), ("status", pa.string()), ("environment", pa.string()),
        ("execution_mode", pa.string()), ("trigger_type", pa.string()), ("caller", pa.string()),
        ("tags", pa.list_(pa.string())), ("parent_run_id", pa.string()), ("retry_of", pa.string()),
        ("retry_strategy", pa.string()), ("created_at", TS), ("started_at", TS), ("finished_at", TS),
        ("updated_at", TS), ("duration_ms", pa.float64()), ("failed_step", pa.string()),
        ("error_message", pa.string()), ("error", JSON), ("steps_count", pa.int32()), ("last_seq", pa.int64()),
        ("archived", pa.bool_()),
    ]),
    "steps": pa.schema([
        ("run_id", pa.string()), ("step", pa.string()), ("position", pa.int64()), ("status", pa.string()),
        ("action", pa.string()), ("attempt", pa.int32()), ("started_at", TS), ("finished_at", TS),
        ("duration_ms", pa.float64()), ("reused_from", pa.string()), ("reason", pa.string()), ("input", JSON),
        ("output", JSON), ("error", JSON),
    ]),
    "attempts": pa.schema([
        ("run_id", pa.string()), ("step", pa.string()), ("attempt", pa.int32()), ("status", pa.string()),
        ("started_at", TS), ("finished_at", TS), ("duration_ms", pa.float64()), ("retry_at", TS),
        ("input", JSON), ("output", JSON), ("error", JSON),
    ]),
}  # fmt: skip


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, option=orjson.OPT_UTC_Z).decode()


def _row(schema: pa.Schema, values: dict[str, Any]) -> dict[str, Any]:
    """`values` restricted to the table's columns, nested values as JSON text."""
    out = {}
    for name in schema.names:
        value = values.get(name)
        # A string value is written as JSON text too ("\"x\""), so every cell of these columns parses as JSON.
        out[name] = _json(value) if name in JSON_COLUMNS else value
    return out


class Table:
    """One output file, appended a row group of `group_rows` rows at a time."""

    def __init__(self, folder: Path, name: str, fmt: str, group_rows: int) -> None:
        self.schema = SCHEMAS[name]
        self.path = folder / f"{name}.{fmt}"
        self.fmt, self.group_rows = fmt, group_rows
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self._parquet = pq.ParquetWriter(self.path, self.schema) if fmt == "parquet" else None
        self._lines: IO[bytes] | None = self.path.open("wb") if fmt == "jsonl" else None

    def add(self, values: dict[str, Any]) -> None:
        self.rows.append(_row(self.schema, values))
        if len(self.rows) >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self._parquet is not None:
            self._parquet.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        elif self._lines is not None:
            self._lines.write(b"".join(orjson.dumps(r, option=orjson.OPT_UTC_Z) + b"\n" for r in self.rows))
        self.count += len(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self._parquet is not None:
            self._parquet.close()
        if self._lines is not None:
            self._lines.close()


class Exporter:
    """Events in, rows out: every event of the window to `events`; each run requested in the window folded, once
    it ends (or when the read ends), into `runs`, `steps` and `attempts`."""

    def __init__(self, folder: Path, fmt: str, since: datetime | None, until: datetime | None,
                 group_rows: int = 10_000) -> None:  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        self.tables = {name: Table(folder, name, fmt, group_rows) for name in SCHEMAS}
        self.since, self.until = since, until
        self.open: dict[str, list[EventBase]] = {}  # runs requested in the window and not ended yet

    def _in_window(self, at: datetime) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)

    def add(self, event: EventBase, partition: int, offset: int) -> None:
        if self._in_window(event.occurred_at):
            self.tables["events"].add({
                "event_id": event.event_id, "type": event.type, "schema_version": event.schema_version,
                "tenant_id": event.tenant_id, "run_id": event.run_id, "flow_id": event.flow_id,
                "flow_version": event.flow_version, "seq": event.seq, "occurred_at": event.occurred_at,
                "causation_id": event.causation_id, "correlation_id": event.correlation_id,
                "payload": event.model_dump(mode="json", include={"payload"})["payload"],
                "partition": partition, "offset": offset,
            })  # fmt: skip
        if isinstance(event, ev.RunRequested):
            if self._in_window(event.occurred_at):
                self.open[event.run_id] = [event]
            return
        held = self.open.get(event.run_id)
        if held is None:
            return  # a run requested outside the window, or already ended and written (a later RunArchived)
        held.append(event)
        if type(event) in TERMINAL_EVENTS:
            self._fold(self.open.pop(event.run_id))

    def _fold(self, events: list[EventBase]) -> None:
        rows, details = plan(events), plan_details(events)
        for row in rows.new_runs.values():
            self.tables["runs"].add({"steps_count": 0, **row})
        for step in rows.step_changes.values():
            self.tables["steps"].add(vars(step))  # shallow: `asdict` deep-copies every value
        for attempt in details.attempts.values():
            self.tables["attempts"].add(vars(attempt))

    def close(self) -> dict[str, int]:
        for events in self.open.values():
            self._fold(events)
        self.open.clear()
        for table in self.tables.values():
            table.close()
        return {name: table.count for name, table in self.tables.items()}


async def export(
    bootstrap: str,
    topics: Topics,
    folder: Path,
    *,
    fmt: str = "parquet",
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    flow: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    group_rows: int = 10_000,
) -> dict[str, int]:
    """Export the ledger's window [since, until) to `folder`; returns the rows written per table. `progress` is
    called with (records read, records to read) as batches arrive."""
    exporter = Exporter(folder, fmt, since, until, group_rows)
    try:
        async with LedgerReader(bootstrap, topics=topics, start=since or "beginning", tenant=tenant, flow=flow,
                                max_records=5000) as reader:  # fmt: skip
            total = await reader.remaining()
            async for batch in reader.batches():
                for item in batch:
                    assert isinstance(item.event, EventBase)
                    exporter.add(item.event, item.partition, item.offset)
                if progress is not None:
                    progress(reader.stats.read, total)
            if progress is not None:
                progress(reader.stats.read, total)
    finally:
        counts = exporter.close()
    return counts
