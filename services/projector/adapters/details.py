"""Writes a DetailPlan: multi-row statements (unnest), increments and upserts, inside the batch's transaction."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel

from schemas import codec
from services.common.runfold.details import RECORD_COUNTERS, DetailPlan
from services.projector import aggregate
from services.projector.adapters.canonical import write_canonical


def _json(value: Any) -> str | None:
    return None if value is None else codec.dumps(value).decode()


_PARAMETER = re.compile(r"\$(\d+)")


class Pending:
    """Write statements of one batch sent together: one statement whose parts are data-modifying WITH clauses, so
    one round trip instead of one a statement (a small batch's round trips are most of its time,
    docs/projector.md#throughput). Each part is an INSERT, UPDATE or DELETE. The parts run on one snapshot and see
    none of each other's changes: two parts never write the same rows, and a statement that must see a part's rows
    runs after `flush`. One part may be `counted`: `flush` then sets `count` to the number of rows it returned."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, tuple[Any, ...]]] = []
        self.counted: int | None = None  # index of the counted part in `parts`
        self.count: int | None = None

    def add(self, sql: str, *args: Any) -> None:
        self.parts.append((sql, args))

    def add_counted(self, sql: str, *args: Any) -> None:
        """A part with RETURNING, whose rows `flush` counts."""
        self.counted = len(self.parts)
        self.parts.append((sql, args))

    async def flush(self, conn: asyncpg.Connection) -> None:
        parts, counted, self.parts, self.counted = self.parts, self.counted, [], None
        if counted is not None:
            self.count = await conn.fetchval(*combine(parts, count=counted))
        elif len(parts) == 1:
            await conn.execute(parts[0][0], *parts[0][1])
        elif parts:
            await conn.execute(*combine(parts))


def combine(parts: list[tuple[str, tuple[Any, ...]]], *, count: int | None = None) -> tuple[Any, ...]:
    """The parts as one statement and its arguments: each part's parameters renumbered after the parts before it.
    The statement returns the number of rows part `count` returned, else 1."""
    clauses: list[str] = []
    args: list[Any] = []
    for sql, part_args in parts:
        if "$$" in sql or sql.lstrip().upper().startswith("WITH"):
            raise ValueError("a part must be a plain data-modifying statement")
        renumbered = _PARAMETER.sub(_shifted(len(args)), sql)
        clauses.append(f"w{len(clauses)} AS ({renumbered})")
        args.extend(part_args)
    result = "SELECT 1" if count is None else f"SELECT count(*) FROM w{count}"
    return ("WITH " + ",\n".join(clauses) + "\n" + result, *args)


def _shifted(shift: int) -> Callable[[re.Match[str]], str]:
    return lambda m: f"${int(m.group(1)) + shift}"


def recordset(columns: tuple[str, ...], types: tuple[str, ...]) -> str:
    """The FROM item of a small batch's rows: $1 is the rows as one JSON array of objects (`rows_json`), read back as
    a table `u` with these columns. One parameter encoded by orjson in one call instead of one array parameter a
    column, whose every element asyncpg checks in Python (that cost more than the rest of the statement's
    encoding). JSON null reads as NULL; a jsonb column takes the JSON value as it is."""
    pairs = ", ".join(f"{c} {t}" for c, t in zip(columns, types, strict=True))
    return f"json_to_recordset($1::text::json) AS u({pairs})"


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")  # as codec.dumps encodes a model
    raise TypeError(f"{type(value).__name__} is not JSON")


def rows_json(rows: list[Any], fields: tuple[str, ...], *, mapping: bool = False) -> str:
    """$1 for `recordset`: each row (an object with `fields` as attributes, or a mapping) as a JSON object. JSON values
    are written as codec.dumps writes them, so jsonb columns get the same values as from `fragment` in a COPY."""
    if mapping:
        objects = [{f: r.get(f) for f in fields} for r in rows]
    else:
        objects = [{f: getattr(r, f) for f in fields} for r in rows]
    return orjson.dumps(objects, option=orjson.OPT_UTC_Z, default=_plain).decode()  # codec.dumps's option


def fragment(value: Any) -> orjson.Fragment | None:
    """A JSON value for a jsonb column of a COPY: encoded once, passed through by the connection's jsonb codec."""
    return None if value is None else orjson.Fragment(codec.dumps(value))


_ATTEMPT_COLUMNS = (
    "run_id", "step", "attempt", "status", "input", "error", "retry_at", "started_at", "finished_at", "duration_ms",
    "output",
)  # fmt: skip
_JSON_ATTEMPT_COLUMNS = {"input", "error", "output"}
# The cast from text is a no-op on the staging table's jsonb columns: one SELECT list for both sources.
_INSERT_ATTEMPTS = """
INSERT INTO step_attempts AS a (run_id, step, attempt, status, input, error, retry_at, started_at, finished_at,
                                duration_ms, output)
SELECT u.run_id, u.step, u.attempt, u.status, u.input::jsonb, u.error::jsonb, u.retry_at, u.started_at,
       u.finished_at, u.duration_ms, u.output::jsonb
"""
_ATTEMPTS_ON_CONFLICT = """
ON CONFLICT (run_id, step, attempt) DO UPDATE SET
    status      = EXCLUDED.status,
    input       = COALESCE(EXCLUDED.input, a.input),
    error       = COALESCE(EXCLUDED.error, a.error),
    output      = COALESCE(EXCLUDED.output, a.output),
    retry_at    = COALESCE(EXCLUDED.retry_at, a.retry_at),
    started_at  = COALESCE(EXCLUDED.started_at, a.started_at),
    finished_at = COALESCE(EXCLUDED.finished_at, a.finished_at),
    duration_ms = COALESCE(EXCLUDED.duration_ms, a.duration_ms)
"""
_ATTEMPT_TYPES = (
    "text", "text", "int", "text", "jsonb", "jsonb", "timestamptz", "timestamptz", "timestamptz", "float8", "jsonb",
)  # fmt: skip
_UPSERT_ATTEMPTS = f"""{_INSERT_ATTEMPTS}
FROM {recordset(_ATTEMPT_COLUMNS, _ATTEMPT_TYPES)}
{_ATTEMPTS_ON_CONFLICT}"""
STAGE_ATTEMPTS = """
CREATE TEMP TABLE IF NOT EXISTS staged_attempts (
    run_id text, step text, attempt int, status text, input jsonb, error jsonb, retry_at timestamptz,
    started_at timestamptz, finished_at timestamptz, duration_ms float8, output jsonb
) ON COMMIT DELETE ROWS
"""
_UPSERT_STAGED_ATTEMPTS = f"{_INSERT_ATTEMPTS}FROM staged_attempts u{_ATTEMPTS_ON_CONFLICT}"

# At least this many rows go through COPY into a staging table, then one INSERT: COPY's rows cost PostgreSQL less
# than JSON, but take two more round trips, so fewer rows (a small batch, where latency counts) are sent as JSON
# (`recordset`) in one statement. Both give the same rows.
COPY_FROM_ROWS = 128

_LOG_COLUMNS = ("run_id", "seq", "tenant_id", "level", "step", "message", "fields", "occurred_at")
_LOG_TYPES = ("text", "int", "text", "text", "text", "text", "jsonb", "timestamptz")
_INSERT_LOGS = f"""
INSERT INTO run_logs ({", ".join(_LOG_COLUMNS)})
SELECT {", ".join(f"u.{c}" for c in _LOG_COLUMNS)}
FROM {recordset(_LOG_COLUMNS, _LOG_TYPES)}
ON CONFLICT DO NOTHING
"""
STAGE_LOGS = """
CREATE TEMP TABLE IF NOT EXISTS staged_logs (LIKE run_logs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_INSERT_STAGED_LOGS = f"""
INSERT INTO run_logs ({", ".join(_LOG_COLUMNS)}) SELECT {", ".join(_LOG_COLUMNS)} FROM staged_logs
ON CONFLICT DO NOTHING
"""

_INSERT_RECORD_ERRORS = """
INSERT INTO record_errors (run_id, seq, tenant_id, step, record_key, field_path, error, raw_error, occurred_at)
SELECT u.run_id, u.seq, u.tenant_id, u.step, u.record_key, u.field_path, u.error, u.raw_error::jsonb, u.occurred_at
FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::timestamptz[])
     AS u(run_id, seq, tenant_id, step, record_key, field_path, error, raw_error, occurred_at)
ON CONFLICT DO NOTHING
"""

_UPDATE_RUN_RECORDS = f"""
UPDATE runs r SET {", ".join(f"records_{n} = r.records_{n} + u.{n}" for n in RECORD_COUNTERS)}
FROM unnest($1::text[], {", ".join(f"${i + 2}::int[]" for i in range(len(RECORD_COUNTERS)))})
     AS u(id, {", ".join(RECORD_COUNTERS)})
WHERE r.id = u.id
"""

_UPDATE_RUN_FAILURES = """
UPDATE runs r SET error_category = u.category, error_fingerprint = u.fingerprint
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, category, fingerprint)
WHERE r.id = u.id
"""

_UPSERT_GROUPS = """
INSERT INTO failure_groups AS g (tenant_id, environment, fingerprint, flow_id, step, category, message_pattern,
                                 sample_message, runs, first_seen, last_seen, last_run_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::int[], $10::timestamptz[], $11::timestamptz[], $12::text[])
ON CONFLICT (tenant_id, environment, fingerprint) DO UPDATE SET
    runs           = g.runs + EXCLUDED.runs,
    first_seen     = LEAST(g.first_seen, EXCLUDED.first_seen),
    last_seen      = GREATEST(g.last_seen, EXCLUDED.last_seen),
    last_run_id    = CASE WHEN EXCLUDED.last_seen >= g.last_seen THEN EXCLUDED.last_run_id ELSE g.last_run_id END,
    sample_message = CASE WHEN EXCLUDED.last_seen >= g.last_seen THEN EXCLUDED.sample_message
                          ELSE g.sample_message END
"""

_ROLLUP_HOURLY = """
INSERT INTO flow_hourly AS h (tenant_id, flow_id, environment, hour, status, trigger_type, runs, duration_ms_sum,
                              records_written, records_failed)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::int[],
                     $8::numeric[], $9::bigint[], $10::bigint[])
ON CONFLICT (tenant_id, flow_id, environment, hour, status, trigger_type) DO UPDATE SET
    runs            = h.runs + EXCLUDED.runs,
    duration_ms_sum = h.duration_ms_sum + EXCLUDED.duration_ms_sum,
    records_written = h.records_written + EXCLUDED.records_written,
    records_failed  = h.records_failed + EXCLUDED.records_failed
"""

_UPSERT_OUTCOMES = """
INSERT INTO step_outcomes AS o (tenant_id, environment, flow_id, flow_version, step, succeeded, failed, retried,
                                last_failed_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::int[], $7::int[], $8::int[],
                     $9::timestamptz[])
ON CONFLICT (tenant_id, environment, flow_id, flow_version, step) DO UPDATE SET
    succeeded      = o.succeeded + EXCLUDED.succeeded,
    failed         = o.failed + EXCLUDED.failed,
    retried        = o.retried + EXCLUDED.retried,
    last_failed_at = GREATEST(o.last_failed_at, EXCLUDED.last_failed_at)
"""

_UPSERT_ENDPOINTS = """
INSERT INTO endpoint_coverage AS e (tenant_id, environment, flow_id, method, host, route, calls, last_seen)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[],
                     $8::timestamptz[])
ON CONFLICT (tenant_id, environment, flow_id, method, host, route) DO UPDATE SET
    calls = e.calls + EXCLUDED.calls, last_seen = GREATEST(e.last_seen, EXCLUDED.last_seen)
"""

# One indexed lookup per batch for every run attribute the aggregates need, instead of a join with
# `runs` in each aggregate statement (whose plan depends on statistics a young table does not have).
_LOOKUP_RUNS = """
SELECT id, tenant_id, environment, flow_id, status, trigger_type, created_at, finished_at, duration_ms,
       failed_step, error_message, records_written, records_failed
FROM runs WHERE id = ANY($1::text[])
"""


def _transpose(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[r[i] for r in rows] for i in range(width)]


def _columns(rows: list[dict[str, Any]], names: tuple[str, ...], json_names: tuple[str, ...] = ()) -> list[list[Any]]:
    return [[_json(r[n]) if n in json_names else r[n] for r in rows] for n in names]


async def upsert_changes(
    conn: asyncpg.Connection,
    changes: list[Any],
    fields: tuple[str, ...],
    json_fields: Collection[str],
    *,
    rows_sql: str,
    stage: str,
    staging_table: str,
    from_staging: str,
    staged: bool,
    pending: Pending,
) -> None:
    """`changes` (objects with `fields` as attributes) upserted by `rows_sql` (its rows from `recordset`) when they are
    fewer than COPY_FROM_ROWS; else COPYed into `staging_table` (made by `stage` unless `staged`) and upserted by
    `from_staging`, the `json_fields` as encoded JSON. The upsert joins `pending`; the COPY, when there is one, runs
    now."""
    if not changes:
        return
    if len(changes) < COPY_FROM_ROWS:
        pending.add(rows_sql, rows_json(changes, fields))
        return
    if not staged:
        await conn.execute(stage)
    records = [tuple(fragment(getattr(c, f)) if f in json_fields else getattr(c, f) for f in fields) for c in changes]
    await conn.copy_records_to_table(staging_table, records=records)
    pending.add(from_staging)


async def add_details(conn: asyncpg.Connection, plan: DetailPlan, pending: Pending, *, staged: bool = False) -> None:
    """The attempts, logs and record errors join `pending` (the batch's event, run and step writes; a large batch's
    rows are COPYed now). `staged`: the staging tables exist on this connection (services.projector.adapters.store
    .stage)."""
    await upsert_changes(
        conn, list(plan.attempts.values()), _ATTEMPT_COLUMNS, _JSON_ATTEMPT_COLUMNS, rows_sql=_UPSERT_ATTEMPTS,
        stage=STAGE_ATTEMPTS, staging_table="staged_attempts", from_staging=_UPSERT_STAGED_ATTEMPTS, staged=staged,
        pending=pending,
    )  # fmt: skip
    if 0 < len(plan.logs) < COPY_FROM_ROWS:
        pending.add(_INSERT_LOGS, rows_json(plan.logs, _LOG_COLUMNS, mapping=True))
    elif plan.logs:
        if not staged:
            await conn.execute(STAGE_LOGS)
        records = [
            (g["run_id"], g["seq"], g["tenant_id"], g["level"], g["step"], g["message"],
             orjson.Fragment(codec.dumps(g["fields"])), g["occurred_at"])
            for g in plan.logs
        ]  # fmt: skip
        await conn.copy_records_to_table("staged_logs", records=records, columns=list(_LOG_COLUMNS))
        pending.add(_INSERT_STAGED_LOGS)
    if plan.record_errors:
        names = ("run_id", "seq", "tenant_id", "step", "record_key", "field_path", "error", "raw_error",
                 "occurred_at")  # fmt: skip
        pending.add(_INSERT_RECORD_ERRORS, *_columns(plan.record_errors, names, ("raw_error",)))


async def write_aggregates(conn: asyncpg.Connection, plan: DetailPlan) -> None:
    """After `add_details`' statement is sent: what reads the runs rows it wrote."""
    # These update runs rows the statement before may have inserted: each after it, on its own.
    if plan.records:
        ids = list(plan.records)
        await conn.execute(_UPDATE_RUN_RECORDS, ids, *[[plan.records[i][n] for i in ids] for n in RECORD_COUNTERS])
    if plan.failures:
        ids = list(plan.failures)
        fs = [plan.failures[i] for i in ids]
        await conn.execute(_UPDATE_RUN_FAILURES, ids, [f.category for f in fs], [f.fingerprint for f in fs])
    touched = (
        set(plan.failures) | set(plan.finished) | {o.run_id for o in plan.outcomes}
        | {e.run_id for e in plan.endpoints} | {e.run_id for e in plan.canonical}
    )  # fmt: skip
    runs = {r["id"]: r for r in await conn.fetch(_LOOKUP_RUNS, list(touched))} if touched else {}
    # The rollups: four tables, each written by one statement, sent as one.
    rollups = Pending()
    if plan.failures and (rows := aggregate.failure_groups(plan, runs)):
        rollups.add(_UPSERT_GROUPS, *_transpose(rows, 12))
    if plan.finished and (rows := aggregate.hourly(plan, runs)):
        rollups.add(_ROLLUP_HOURLY, *_transpose(rows, 10))
    if plan.outcomes and (rows := aggregate.outcomes(plan, runs)):
        rollups.add(_UPSERT_OUTCOMES, *_transpose(rows, 9))
    if plan.endpoints and (rows := aggregate.endpoints(plan, runs)):
        rollups.add(_UPSERT_ENDPOINTS, *_transpose(rows, 8))
    await rollups.flush(conn)
    await write_canonical(conn, plan.canonical, {i: r["environment"] for i, r in runs.items()})
