"""Applies a batch to PostgreSQL: events, coalesced run and step changes and the offsets, in one transaction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from schemas import codec
from schemas.events import (
    TERMINAL_EVENTS,
    EventBase,
    FlowEventBase,
    FlowPaused,
    FlowResumed,
    FlowVersionPublished,
)
from services.common.runfold.details import plan_details
from services.common.runfold.rows import BatchPlan, plan
from services.projector import connectors, metrics, retention
from services.projector.adapters import alerts, search, webhooks
from services.projector.adapters.details import (
    COPY_FROM_ROWS,
    STAGE_ATTEMPTS,
    STAGE_LOGS,
    Pending,
    add_details,
    recordset,
    rows_json,
    upsert_changes,
    write_aggregates,
)
from services.projector.adapters.transaction import (
    SchemaGuard,
    SchemaSwapped,
    begin_text,
    commit_text,
    open_transaction,
    rollback,
    schema_oid,
    swap_lock_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Positioned:
    """An event with where it was read from."""

    topic: str
    partition: int
    offset: int
    event: Any  # EventBase for the ledger, FlowEventBase for the flows topic


@dataclass(frozen=True, slots=True)
class BatchResult:
    events: int
    duplicates: int
    runs_changed: int
    finished: dict[str, int] = field(default_factory=dict)  # final status → runs that reached it


_STAGE_EVENTS = """
CREATE TEMP TABLE IF NOT EXISTS staged_events (LIKE run_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""

_EVENT_COLUMNS = (
    "run_id", "seq", "event_id", "type", "tenant_id", "occurred_at", "causation_id", "payload", "kafka_partition",
    "kafka_offset",
)  # fmt: skip
__all__ = ["SchemaGuard", "SchemaSwapped", "schema_oid", "swap_lock_key"]  # the transaction's, used with apply_batch

# Events of runs the retention purge already removed are duplicates, as run_events would have said.
_EVENT_TYPES = ("text", "int", "text", "text", "text", "timestamptz", "text", "jsonb", "int", "bigint")
_INSERT_EVENTS = f"""
INSERT INTO run_events ({", ".join(_EVENT_COLUMNS)})
SELECT {", ".join(f"u.{c}" for c in _EVENT_COLUMNS)}
FROM {recordset(_EVENT_COLUMNS, _EVENT_TYPES)}
LEFT JOIN purged_runs p ON p.run_id = u.run_id
WHERE p.run_id IS NULL OR u.seq > p.last_seq
ON CONFLICT (run_id, seq) DO NOTHING
RETURNING run_id, seq
"""
_INSERT_STAGED_EVENTS = """
INSERT INTO run_events
SELECT s.* FROM staged_events s LEFT JOIN purged_runs p ON p.run_id = s.run_id
WHERE p.run_id IS NULL OR s.seq > p.last_seq
ON CONFLICT (run_id, seq) DO NOTHING
RETURNING run_id, seq
"""


_RUN_COLUMNS = (
    "id", "tenant_id", "flow_id", "flow_version", "flow_name", "status", "environment", "execution_mode",
    "trigger_type", "caller", "trigger_payload", "tags", "parent_run_id", "retry_of", "bulk_operation_id",
    "failed_step", "error", "error_message", "steps_count", "created_at", "started_at", "finished_at",
    "updated_at", "duration_ms", "last_seq", "archived", "cursor_window", "retry_strategy",
)  # fmt: skip
_RUN_TYPES = (
    "text", "text", "text", "int", "text", "text", "text", "text", "text", "text", "jsonb", "jsonb",
    "text", "text", "text", "text", "jsonb", "text", "int", "timestamptz", "timestamptz", "timestamptz",
    "timestamptz", "float8", "int", "bool", "jsonb", "text",
)  # fmt: skip
# tags (text[]) is read from its JSON list.
_JSON_RUN_COLUMNS = {"trigger_payload", "error", "tags", "cursor_window"}


def _select(column: str) -> str:
    if column == "tags":
        return "ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb))"
    if column in _JSON_RUN_COLUMNS:
        return f"u.{column}::jsonb"
    return f"u.{column}"


_RUN_DEFAULTS: dict[str, Any] = {"steps_count": 0, "archived": False}

_INSERT_RUNS = f"""
INSERT INTO runs ({", ".join(_RUN_COLUMNS)})
SELECT {", ".join(_select(c) for c in _RUN_COLUMNS)}
FROM {recordset(_RUN_COLUMNS, _RUN_TYPES)}
ON CONFLICT (id) DO UPDATE SET ({", ".join(_RUN_COLUMNS)}) = ({", ".join(f"excluded.{c}" for c in _RUN_COLUMNS)})
WHERE runs.last_seq < 0  -- the placeholder written at acceptance (services/common/accepted.py) is replaced whole
"""

# The fields of a RunChange / StepChange, in the order of their unnest's parameters ($1, $2 …).
_RUN_CHANGE = (
    "id", "status", "started_at", "finished_at", "duration_ms", "failed_step", "error", "error_message", "steps_delta",
    "updated_at", "last_seq", "archived", "cursor_window", "bulk_operation_id",
)  # fmt: skip
_STEP_CHANGE = (
    "run_id", "step", "position", "status", "action", "attempt", "input", "output", "error", "assertions",
    "extractions", "started_at", "finished_at", "duration_ms", "reused_from", "reason",
)  # fmt: skip
_JSON_STEP_CHANGE = {"input", "output", "error", "assertions", "extractions"}

_RUN_CHANGE_TYPES = (
    "text", "text", "timestamptz", "timestamptz", "float8", "text", "jsonb", "text", "int", "timestamptz", "int",
    "bool", "jsonb", "text",
)  # fmt: skip
_UPDATE_RUNS = f"""
UPDATE runs r SET
    status        = COALESCE(u.status, r.status),
    started_at    = COALESCE(u.started_at, r.started_at),
    finished_at   = COALESCE(u.finished_at, r.finished_at),
    duration_ms   = COALESCE(u.duration_ms, r.duration_ms),
    failed_step   = COALESCE(u.failed_step, r.failed_step),
    error         = COALESCE(u.error::jsonb, r.error),
    error_message = COALESCE(u.error_message, r.error_message),
    steps_count   = r.steps_count + u.steps_delta,
    updated_at    = GREATEST(u.updated_at, r.updated_at),
    last_seq      = GREATEST(u.last_seq, r.last_seq),
    archived      = COALESCE(u.archived, r.archived),
    cursor_window = COALESCE(u.cursor_window::jsonb, r.cursor_window),
    bulk_operation_id = COALESCE(u.bulk_operation_id, r.bulk_operation_id)
FROM {recordset(_RUN_CHANGE, _RUN_CHANGE_TYPES)}
WHERE r.id = u.id
"""

_STEPS_ON_CONFLICT = """
ON CONFLICT (run_id, step) DO UPDATE SET
    position    = LEAST(EXCLUDED.position, s.position),
    status      = EXCLUDED.status,
    action      = COALESCE(EXCLUDED.action, s.action),
    attempt     = GREATEST(EXCLUDED.attempt, s.attempt),
    input       = COALESCE(EXCLUDED.input, s.input),
    output      = COALESCE(EXCLUDED.output, s.output),
    -- A step that finally succeeded shows no error; its failed attempts stay in run_events.
    error       = CASE WHEN EXCLUDED.status = 'SUCCEEDED' THEN NULL ELSE COALESCE(EXCLUDED.error, s.error) END,
    assertions  = COALESCE(EXCLUDED.assertions, s.assertions),
    extractions = COALESCE(EXCLUDED.extractions, s.extractions),
    started_at  = COALESCE(EXCLUDED.started_at, s.started_at),
    finished_at = CASE WHEN EXCLUDED.status IN ('RUNNING', 'RETRYING') THEN NULL
                       ELSE COALESCE(EXCLUDED.finished_at, s.finished_at) END,
    duration_ms = COALESCE(EXCLUDED.duration_ms, s.duration_ms),
    reused_from = COALESCE(EXCLUDED.reused_from, s.reused_from),
    reason      = COALESCE(EXCLUDED.reason, s.reason)
"""
_INSERT_STEPS = f"""
INSERT INTO run_steps AS s ({", ".join(_STEP_CHANGE)})
SELECT u.run_id, u.step, u.position, u.status, u.action, COALESCE(u.attempt, 1), u.input::jsonb,
       u.output::jsonb, u.error::jsonb, u.assertions::jsonb, u.extractions::jsonb, u.started_at, u.finished_at,
       u.duration_ms, u.reused_from, u.reason
"""
_STEP_TYPES = (
    "text", "text", "int", "text", "text", "int", "jsonb", "jsonb", "jsonb", "jsonb", "jsonb", "timestamptz",
    "timestamptz", "float8", "text", "text",
)  # fmt: skip
_UPSERT_STEPS = f"""{_INSERT_STEPS}
FROM {recordset(_STEP_CHANGE, _STEP_TYPES)}
{_STEPS_ON_CONFLICT}"""
# Large batches' step changes: COPY into this staging table (a StepChange's fields in order, no constraints: a change
# may leave `attempt` null), then the same upsert from it.
_STAGE_STEPS = """
CREATE TEMP TABLE IF NOT EXISTS staged_steps (
    run_id text, step text, position int, status text, action text, attempt int, input jsonb, output jsonb,
    error jsonb, assertions jsonb, extractions jsonb, started_at timestamptz, finished_at timestamptz,
    duration_ms float8, reused_from text, reason text
) ON COMMIT DELETE ROWS
"""
_UPSERT_STAGED_STEPS = f"{_INSERT_STEPS}FROM staged_steps u{_STEPS_ON_CONFLICT}"


async def stage(conn: asyncpg.Connection) -> None:
    """Once per connection, outside a transaction: the session's staging tables `apply_batch(staged=True)` copies
    events, step changes, attempts and logs into (temporary tables, emptied at each commit)."""
    await conn.execute(_STAGE_EVENTS)
    await conn.execute(_STAGE_STEPS)
    await conn.execute(STAGE_ATTEMPTS)
    await conn.execute(STAGE_LOGS)


async def load_offsets(conn: asyncpg.Connection, group: str, topic: str) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM projector_offsets WHERE consumer_group = $1 AND topic = $2",
        group,
        topic,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


async def apply_batch(
    conn: asyncpg.Connection,
    group: str,
    batch: list[Positioned],
    guard: SchemaGuard | None = None,
    *,
    side_effects: bool = True,
    staged: bool = False,
) -> BatchResult:
    """One transaction: new events, their row changes, offsets. `side_effects=False` (a rebuild's replay)
    enqueues no webhook deliveries: those were offered when the events first happened. `staged`: `stage` ran on
    this connection, so the batch need not make sure its staging table exists."""
    ledger = [p for p in batch if isinstance(p.event, EventBase)]
    flows = [p for p in batch if isinstance(p.event, FlowEventBase)]
    # The transaction is opened and committed by hand so that BEGIN travels with the guard and COMMIT with the
    # offsets: a small batch's round trips are most of its time (docs/projector.md#throughput).
    await open_transaction(conn, begin_text(guard), guard)
    try:
        unique = _first_in_log_order(ledger)
        written = await _write_rows(conn, unique, staged, assume_new=True)
        if written is None:
            # Some events were in run_events already (redelivered) or belong to runs the retention purge removed:
            # undo, and write again knowing which are new. The guard is checked again with the new BEGIN.
            await open_transaction(conn, "ROLLBACK; " + begin_text(guard), guard)
            written = await _write_rows(conn, unique, staged, assume_new=False)
            assert written is not None  # only a batch assumed new can turn out not to be
        new_events, changes = written
        for run_id, seq, before, after in changes.out_of_order:
            metrics.OUT_OF_ORDER.inc()
            log.warning("run %s seq %s: %s -> %s is not an allowed transition; projected as logged", run_id, seq,
                        before, after)  # fmt: skip
        await search.append(conn, new_events)
        await retention.enforce_marks(conn, list({e.run_id for e in new_events if type(e) in TERMINAL_EVENTS}))
        for p in flows:
            await _apply_flow_event(conn, p.event)
        # Alert history is derived (a replay recomputes it); only its deliveries are a side effect.
        await alerts.evaluate(conn, new_events, deliver=side_effects)
        await connectors.project(conn, new_events, deliver=side_effects)
        if side_effects:
            await webhooks.enqueue(conn, new_events, [p.event for p in flows])
        await conn.execute(
            commit_text(group, ((p.topic, p.partition, p.offset) for p in batch), notify=bool(new_events))
        )
    except BaseException:
        await rollback(conn)
        raise
    finished: dict[str, int] = {}
    for e in new_events:
        if (status := TERMINAL_EVENTS.get(type(e))) is not None:
            finished[status.value] = finished.get(status.value, 0) + 1
    return BatchResult(
        finished=finished,
        events=len(ledger),
        duplicates=len(ledger) - len(new_events),
        runs_changed=len(changes.new_runs) + len(changes.run_changes),
    )


def _first_in_log_order(ledger: list[Positioned]) -> list[Positioned]:
    """One event per (run, seq): the first in log order wins."""
    unique: dict[tuple[str, int], Positioned] = {}
    for p in ledger:
        unique.setdefault((p.event.run_id, p.event.seq), p)
    return list(unique.values())


async def _write_rows(
    conn: asyncpg.Connection, unique: list[Positioned], staged: bool, *, assume_new: bool
) -> tuple[list[EventBase], BatchPlan] | None:
    """The events and the run, step and detail rows they change; returns the new events and their plan.
    `assume_new`: the rows are planned from every event and sent in one statement with the events' insert, which
    counts the events it inserted; when some were not new the result is None, and the transaction must be rolled
    back. Otherwise the insert goes first and the rows are planned from the events it inserted."""
    pending = Pending()
    if assume_new:
        new_events = [p.event for p in unique]
        if unique:
            await _add_events(conn, unique, staged, pending)
    else:
        new_events = await _insert_events(conn, unique, staged)
    changes = plan(new_events)
    details = plan_details(new_events)
    await _write_runs(conn, changes, pending)
    await _write_steps(conn, changes, staged, pending)
    await add_details(conn, details, pending, staged=staged)
    await pending.flush(conn)
    if assume_new and unique and pending.count != len(unique):
        return None
    await write_aggregates(conn, details)
    return new_events, changes


async def _add_events(conn: asyncpg.Connection, rows: list[Positioned], staged: bool, pending: Pending) -> None:
    """The insert into run_events, as `pending`'s counted part (it returns the rows it inserted)."""
    if len(rows) < COPY_FROM_ROWS:
        # A few events (latency counts): one JSON parameter.
        events = [
            {"run_id": e.run_id, "seq": e.seq, "event_id": e.event_id, "type": e.type, "tenant_id": e.tenant_id,
             "occurred_at": e.occurred_at, "causation_id": e.causation_id,
             "payload": orjson.Fragment(codec.dumps_model(e.payload)), "kafka_partition": p.partition,
             "kafka_offset": p.offset}
            for p in rows if (e := p.event) is not None
        ]  # fmt: skip
        pending.add_counted(_INSERT_EVENTS, rows_json(events, _EVENT_COLUMNS, mapping=True))
        return
    # COPY into a per-session staging table, then one INSERT … ON CONFLICT: COPY's binary rows cost far
    # less to send and parse than parameters, and the payload JSON is passed through unparsed.
    if not staged:
        await conn.execute(_STAGE_EVENTS)
    await conn.copy_records_to_table(
        "staged_events",
        records=[
            (
                p.event.run_id, p.event.seq, p.event.event_id, p.event.type, p.event.tenant_id, p.event.occurred_at,
                p.event.causation_id, orjson.Fragment(codec.dumps_model(p.event.payload)), p.partition, p.offset,
            )
            for p in rows
        ],
    )  # fmt: skip
    pending.add_counted(_INSERT_STAGED_EVENTS)


async def _insert_events(conn: asyncpg.Connection, rows: list[Positioned], staged: bool) -> list[EventBase]:
    """Insert into run_events on its own; returns the events that were new, in log order."""
    if not rows:
        return []
    pending = Pending()
    await _add_events(conn, rows, staged, pending)
    sql, args = pending.parts[0]
    inserted = await conn.fetch(sql, *args)
    fresh = {(r["run_id"], r["seq"]) for r in inserted}
    return [p.event for p in rows if (p.event.run_id, p.event.seq) in fresh]


async def _write_runs(conn: asyncpg.Connection, changes: BatchPlan, pending: Pending) -> None:
    if changes.new_runs:
        rows = [{c: row.get(c, _RUN_DEFAULTS.get(c)) for c in _RUN_COLUMNS} for row in changes.new_runs.values()]
        pending.add(_INSERT_RUNS, rows_json(rows, _RUN_COLUMNS, mapping=True))
    if changes.run_changes:
        if not changes.new_runs.keys().isdisjoint(changes.run_changes):
            await pending.flush(conn)  # one statement writes a row once: the insert goes first, on its own
        pending.add(_UPDATE_RUNS, rows_json(list(changes.run_changes.values()), _RUN_CHANGE))


async def _write_steps(conn: asyncpg.Connection, changes: BatchPlan, staged: bool, pending: Pending) -> None:
    await upsert_changes(
        conn, list(changes.step_changes.values()), _STEP_CHANGE, _JSON_STEP_CHANGE, rows_sql=_UPSERT_STEPS,
        stage=_STAGE_STEPS, staging_table="staged_steps", from_staging=_UPSERT_STAGED_STEPS, staged=staged,
        pending=pending,
    )  # fmt: skip


async def _apply_flow_event(conn: asyncpg.Connection, event: FlowEventBase) -> None:
    if isinstance(event, FlowVersionPublished):
        f = event.flow
        await conn.execute(
            """
            INSERT INTO flow_versions (tenant_id, flow_id, version, definition, published_at)
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING
            """,
            event.tenant_id, event.flow_id, event.flow_version, f.model_dump(mode="json"), event.occurred_at,
        )  # fmt: skip
        await conn.execute(
            """
            INSERT INTO flows (tenant_id, id, name, description, latest_version, environment, trigger_type, tags,
                               created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
            ON CONFLICT (tenant_id, id) DO UPDATE SET
                name = EXCLUDED.name, description = EXCLUDED.description,
                latest_version = GREATEST(flows.latest_version, EXCLUDED.latest_version),
                environment = EXCLUDED.environment, trigger_type = EXCLUDED.trigger_type,
                tags = EXCLUDED.tags, updated_at = EXCLUDED.updated_at
            WHERE EXCLUDED.latest_version >= flows.latest_version
            """,
            event.tenant_id, event.flow_id, f.name, f.description, event.flow_version, f.environment.value,
            f.trigger.type, list(f.tags), event.occurred_at,
        )  # fmt: skip
    elif isinstance(event, FlowPaused | FlowResumed):
        await conn.execute(
            "UPDATE flows SET status = $3, updated_at = $4 WHERE tenant_id = $1 AND id = $2",
            event.tenant_id, event.flow_id, "paused" if isinstance(event, FlowPaused) else "active",
            event.occurred_at,
        )  # fmt: skip
