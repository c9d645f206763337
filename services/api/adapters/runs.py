"""The SQL behind the runs API. Every query takes the caller's tenant and environment (invariant 7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, get_args

import asyncpg
from pydantic import BaseModel, StrictStr, TypeAdapter

from schemas.events import RECORD_COUNTERS
from services.api.adapters.sql import Where, contains
from services.api.models.runs import LogLine, RecordError, RetryLink, RunEvent, RunStep, RunSummary, StepAttempt
from services.common.cursor import CursorCodec, InvalidCursor

SUMMARY_COLUMNS = tuple(RunSummary.model_fields)  # the runs columns a summary shows, under the same names
_SELECT_SUMMARY = ", ".join(SUMMARY_COLUMNS)
_SELECT_RECORDS = ", ".join(f"records_{n}" for n in RECORD_COUNTERS)


# What `q` searches, exactly as runs_search_idx indexes it (migration 0024): the planner uses the index only for
# this expression, to the character. search_details is the projector's text of the run's record errors and of the
# upstream's answer to a failed step (services/projector/adapters/search.py).
SEARCH_TEXT = "(id || E'\\n' || coalesce(error_message, '') || E'\\n' || coalesce(search_details, ''))"


@dataclass(frozen=True)
class Sort:
    """`sort=-created_at`: a column (or expression) and a direction; ties broken by id the same way."""

    name: str
    descending: bool

    @property
    def expression(self) -> str:
        return SORTABLE[self.name]

    @classmethod
    def parse(cls, text: str) -> Sort:
        name = text.strip().lstrip("-+")
        if name == "duration_ms":
            name = "duration"
        if name not in SORTABLE:
            raise ValueError(f"cannot sort by {name!r}; sortable: {', '.join(SORTABLE)} (prefix - for descending)")
        return cls(name, text.strip().startswith("-"))

    def __str__(self) -> str:
        return ("-" if self.descending else "") + self.name


# Unfinished runs have no duration; they sort below every finished one.
SORTABLE = {
    "created_at": "created_at",
    "updated_at": "updated_at",
    "status": "status",
    "duration": "COALESCE(duration_ms, -1)",
}


class _Position(BaseModel):
    """A runs cursor's JSON: the sort it was made for, the sort key and id of a row, which way to read."""

    s: str
    v: Any
    i: str
    b: bool


_POSITION: CursorCodec[_Position] = CursorCodec(_Position)
_VALUE: dict[str, TypeAdapter[Any]] = {
    "created_at": TypeAdapter(datetime),
    "updated_at": TypeAdapter(datetime),
    "duration": TypeAdapter(float),
    "status": TypeAdapter(StrictStr),
}


@dataclass(frozen=True)
class Cursor:
    """A position in one sort order: the sort key and id of a row, and which way to read from it."""

    sort: str
    value: Any
    run_id: str
    backward: bool = False

    def encode(self) -> str:
        return _POSITION.encode(_Position(s=self.sort, v=self.value, i=self.run_id, b=self.backward))

    @classmethod
    def decode(cls, text: str, sort: Sort) -> Cursor:
        """The position, or InvalidCursor (400) for a cursor not handed out for this sort."""
        position = _POSITION.decode(text)
        if position.s != str(sort):
            raise InvalidCursor(f"it belongs to sort={position.s}; send the same sort with it")
        try:
            value = _VALUE[sort.name].validate_python(position.v)
        except ValueError:
            raise InvalidCursor() from None
        return cls(position.s, value, position.i, position.b)

    def flipped(self) -> Cursor:
        return Cursor(self.sort, self.value, self.run_id, not self.backward)


def _sort_value(row: asyncpg.Record, sort: Sort) -> Any:
    if sort.name == "duration":
        return row["duration_ms"] if row["duration_ms"] is not None else -1.0
    return row[sort.name]


@dataclass
class RunFilter:
    tenant_id: str
    environment: str
    flow_ids: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    trigger_types: list[str] = field(default_factory=list)
    execution_modes: list[str] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    q: str | None = None
    ids: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    failed_step: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    include_archived: bool = False
    exclude_ids: list[str] = field(default_factory=list)
    bulk_operation_id: str | None = None
    retry_of: str | None = None

    def where(self) -> tuple[list[str], list[Any]]:
        """SQL conditions and their parameters ($1, $2, … in order)."""
        where = Where()
        add = where.add
        add("tenant_id = ?", self.tenant_id)
        add("environment = ?", self.environment)
        where.one_or_any("flow_id", self.flow_ids)
        where.one_or_any("status", self.statuses)
        where.any_of("trigger_type", self.trigger_types)
        where.any_of("execution_mode", self.execution_modes)
        where.any_of("caller", self.callers)
        where.equal("error_fingerprint", self.fingerprint)
        if self.q:
            # A case-insensitive substring of the run id, its error message or its search details (record errors,
            # upstream bodies), through the one trigram index on SEARCH_TEXT.
            add(f"{SEARCH_TEXT} ILIKE ?", contains(self.q))
        where.any_of("id", self.ids)
        if self.tags:
            add("tags @> ?::text[]", self.tags)
        where.equal("failed_step", self.failed_step)
        if self.created_after is not None:
            add("created_at >= ?", self.created_after)
        if self.created_before is not None:
            add("created_at < ?", self.created_before)
        if self.exclude_ids:
            add("NOT (id = ANY(?::text[]))", self.exclude_ids)
        where.equal("bulk_operation_id", self.bulk_operation_id)
        where.equal("retry_of", self.retry_of)  # runs_retry_of_idx
        if not self.include_archived:
            where.clauses.append("NOT archived")
        return where.clauses, where.args


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    next_cursor: str | None
    prev_cursor: str | None


async def list_runs(
    pool: asyncpg.Pool, flt: RunFilter, limit: int, sort: Sort, cursor: Cursor | None = None, offset: int = 0
) -> Page:
    """Keyset-paginated on (sort key, id), so pages stay stable while new runs arrive; or by offset."""
    clauses, args = flt.where()
    backward = cursor is not None and cursor.backward
    # Reading backward walks the opposite direction from the cursor, then the page is flipped back.
    descending = sort.descending != backward
    if cursor is not None:
        args += [cursor.value, cursor.run_id]
        clauses.append(f"({sort.expression}, id) {'<' if descending else '>'} (${len(args) - 1}, ${len(args)})")
    direction = "DESC" if descending else "ASC"
    args.append(limit + 1)
    sql = (
        f"SELECT {_SELECT_SUMMARY} FROM runs WHERE {' AND '.join(clauses)} "
        f"ORDER BY {sort.expression} {direction}, id {direction} LIMIT ${len(args)}"
    )
    if offset:
        args.append(offset)
        sql += f" OFFSET ${len(args)}"
    rows = await pool.fetch(sql, *args)
    more = len(rows) > limit
    rows = rows[:limit]
    if backward:
        rows.reverse()
    has_before = more if backward else (cursor is not None or offset > 0)
    has_after = True if backward else more
    if not rows:
        # An empty page still lets the client turn back the way it came.
        if cursor is None:
            return Page([], None, None)
        return Page(
            [], cursor.flipped().encode() if backward else None, None if backward else cursor.flipped().encode()
        )
    first, last = rows[0], rows[-1]
    key = str(sort)
    return Page(
        rows,
        Cursor(key, _sort_value(last, sort), last["id"]).encode() if has_after else None,
        Cursor(key, _sort_value(first, sort), first["id"], backward=True).encode() if has_before else None,
    )


async def get_run(pool: asyncpg.Pool, tenant_id: str, environment: str, run_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_SELECT_SUMMARY}, tenant_id, trigger_payload, error, cursor_window, {_SELECT_RECORDS} FROM runs "
        "WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        run_id, tenant_id, environment,
    )  # fmt: skip


def _object(fields: dict[str, str]) -> str:
    """A jsonb object of SQL expressions under their names: {"name": "s.step"} → jsonb_build_object('name', s.step)."""
    return "jsonb_build_object(" + ", ".join(f"'{name}', {sql}" for name, sql in fields.items()) + ")"


def _named(model: type[BaseModel], alias: str, renamed: dict[str, str]) -> dict[str, str]:
    """The model's fields as columns of `alias`, each under the field's name unless `renamed` says otherwise. Times
    are written in UTC with a `Z` (jsonb would write them in the session's time zone), as every answer has them."""
    out = {}
    for name, info in model.model_fields.items():
        sql = renamed.get(name, f"{alias}.{name}")
        if datetime in (info.annotation, *get_args(info.annotation)):
            sql = f"""to_char({sql} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
        out[name] = sql
    return out


_ATTEMPT = _object(_named(StepAttempt, "a", {}))
_STEP = _object(
    _named(RunStep, "s", {
        "name": "s.step",
        "assertions": "coalesce(s.assertions, '[]'::jsonb)",
        "extractions": "coalesce(s.extractions, '{}'::jsonb)",
        "attempts": f"(SELECT coalesce(jsonb_agg({_ATTEMPT} ORDER BY a.attempt), '[]'::jsonb) FROM step_attempts a "
        "WHERE a.run_id = s.run_id AND a.step = s.step)",
    })
)  # fmt: skip
_RETRY = _object(_named(RetryLink, "x", {"strategy": "x.retry_strategy"}))

# GET /v1/runs/{id} in one round trip: the run, its steps with their attempts, the flow version it ran, its retries
# (runs_retry_of_idx) and, while it is paused, the request a human must answer. The children are read only when
# the run is the caller's, as jsonb objects whose keys are the fields of the answer's models (RunStep, StepAttempt,
# RetryLink).
_DETAIL = (
    f"SELECT {', '.join('r.' + c for c in SUMMARY_COLUMNS)}, r.tenant_id, r.trigger_payload, r.error, "
    f"r.cursor_window, {', '.join(f'r.records_{n}' for n in RECORD_COUNTERS)}, "
    f"(SELECT coalesce(jsonb_agg({_STEP} ORDER BY s.position), '[]'::jsonb) FROM run_steps s "
    " WHERE s.run_id = r.id) AS steps, "
    f"r.retry_strategy, (SELECT coalesce(jsonb_agg({_RETRY} ORDER BY x.created_at, x.id), '[]'::jsonb) FROM runs x "
    " WHERE x.retry_of = r.id AND x.tenant_id = r.tenant_id AND x.environment = r.environment) AS retries, "
    "(SELECT f.definition FROM flow_versions f "
    " WHERE f.tenant_id = r.tenant_id AND f.flow_id = r.flow_id AND f.version = r.flow_version) AS flow, "
    "CASE WHEN r.status = 'PAUSED' THEN (SELECT e.payload FROM run_events e "
    " WHERE e.run_id = r.id AND e.type = 'RunPaused' ORDER BY e.seq DESC LIMIT 1) END AS waiting_for "
    "FROM runs r WHERE r.id = $1 AND r.tenant_id = $2 AND r.environment = $3"
)


async def get_run_detail(pool: asyncpg.Pool, tenant_id: str, environment: str, run_id: str) -> asyncpg.Record | None:
    """The run as `get_run` returns it plus `steps` (RunStep objects, by position, each with its attempts),
    `retry_strategy`, `retries` (RetryLink objects, oldest first), `flow` (the definition of the version it ran)
    and `waiting_for` (the payload of the latest RunPaused while the run is PAUSED)."""
    return await pool.fetchrow(_DETAIL, run_id, tenant_id, environment)


async def _by_seq(
    pool: asyncpg.Pool,
    line: type[BaseModel],
    table: str,
    run_id: str,
    after_seq: int,
    limit: int,
    conditions: str = "",
    *args: Any,
) -> list[asyncpg.Record]:
    """A page of a run's lines in `table` after `after_seq`, in seq order, as columns named like `line`'s fields;
    `conditions` narrow it further with parameters $4, $5 … (`args`)."""
    return await pool.fetch(
        f"SELECT {', '.join(line.model_fields)} FROM {table} WHERE run_id = $1 AND seq > $2 {conditions} "
        "ORDER BY seq LIMIT $3",
        run_id, after_seq, limit, *args,
    )  # fmt: skip


async def get_events(pool: asyncpg.Pool, run_id: str, after_seq: int, limit: int) -> list[asyncpg.Record]:
    return await _by_seq(pool, RunEvent, "run_events", run_id, after_seq, limit)


async def get_events_until(pool: asyncpg.Pool, run_id: str, until: int | datetime) -> list[asyncpg.Record]:
    column = "seq" if isinstance(until, int) else "occurred_at"
    return await pool.fetch(
        f"SELECT seq, event_id, type, occurred_at, causation_id, payload FROM run_events "
        f"WHERE run_id = $1 AND {column} <= $2 ORDER BY seq",
        run_id, until,
    )  # fmt: skip


async def get_logs(
    pool: asyncpg.Pool, run_id: str, levels: list[str], step: str | None, after_seq: int, limit: int
) -> list[asyncpg.Record]:
    return await _by_seq(
        pool, LogLine, "run_logs", run_id, after_seq, limit,
        "AND (cardinality($4::text[]) = 0 OR level = ANY($4::text[])) AND ($5::text IS NULL OR step = $5)",
        levels, step,
    )  # fmt: skip


async def get_record_errors(
    pool: asyncpg.Pool, run_id: str, step: str | None, after_seq: int, limit: int
) -> list[asyncpg.Record]:
    return await _by_seq(
        pool, RecordError, "record_errors", run_id, after_seq, limit, "AND ($4::text IS NULL OR step = $4)", step
    )
