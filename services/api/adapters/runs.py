"""The SQL behind the runs API. Every query takes the caller's tenant and environment (invariant 7)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

SUMMARY_COLUMNS = (
    "id", "flow_id", "flow_version", "flow_name", "status", "environment", "execution_mode", "trigger_type",
    "caller", "tags", "parent_run_id", "retry_of", "bulk_operation_id", "failed_step", "error_message",
    "steps_count", "created_at", "started_at", "finished_at", "updated_at", "duration_ms", "archived",
    "error_category", "error_fingerprint",
)  # fmt: skip
_SELECT_SUMMARY = ", ".join(SUMMARY_COLUMNS)
RECORD_COUNTERS = ("read", "transformed", "written", "deduped", "skipped", "failed")
_SELECT_RECORDS = ", ".join(f"records_{n}" for n in RECORD_COUNTERS)


# What `q` searches, exactly as runs_search_idx indexes it (migration 0024): the planner uses the index only for
# this expression, to the character. search_details is the projector's text of the run's record errors and of the
# upstream's answer to a failed step (services/projector/adapters/search.py).
SEARCH_TEXT = "(id || E'\\n' || coalesce(error_message, '') || E'\\n' || coalesce(search_details, ''))"


class CursorError(ValueError):
    """A cursor this API did not hand out, or one from another query."""


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
_TIME_SORTS = {"created_at", "updated_at"}


@dataclass(frozen=True)
class Cursor:
    """A position in one sort order: the sort key and id of a row, and which way to read from it."""

    sort: str
    value: Any
    run_id: str
    backward: bool = False

    def encode(self) -> str:
        value = self.value.isoformat() if isinstance(self.value, datetime) else self.value
        raw = orjson.dumps({"s": self.sort, "v": value, "i": self.run_id, "b": self.backward})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, sort: Sort) -> Cursor:
        try:
            raw = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            made_for = str(raw["s"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CursorError("cursor is not one this API returned") from exc
        if made_for != str(sort):
            raise CursorError(f"cursor belongs to sort={made_for}; send the same sort with it")
        try:
            value = raw["v"]
            if sort.name in _TIME_SORTS:
                value = datetime.fromisoformat(value)
            elif sort.name == "duration":
                value = float(value)
            elif not isinstance(value, str):
                raise TypeError("status cursor value")
            return cls(made_for, value, str(raw["i"]), bool(raw["b"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CursorError("cursor is not one this API returned") from exc

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
        clauses: list[str] = []
        args: list[Any] = []

        def add(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.replace("?", f"${len(args)}"))

        add("tenant_id = ?", self.tenant_id)
        add("environment = ?", self.environment)
        if len(self.flow_ids) == 1:
            add("flow_id = ?", self.flow_ids[0])
        elif self.flow_ids:
            add("flow_id = ANY(?::text[])", self.flow_ids)
        if len(self.statuses) == 1:
            add("status = ?", self.statuses[0])
        elif self.statuses:
            add("status = ANY(?::text[])", self.statuses)
        if self.trigger_types:
            add("trigger_type = ANY(?::text[])", self.trigger_types)
        if self.execution_modes:
            add("execution_mode = ANY(?::text[])", self.execution_modes)
        if self.callers:
            add("caller = ANY(?::text[])", self.callers)
        if self.fingerprint is not None:
            add("error_fingerprint = ?", self.fingerprint)
        if self.q:
            # A case-insensitive substring of the run id, its error message or its search details (record errors,
            # upstream bodies), through the one trigram index on SEARCH_TEXT.
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            add(f"{SEARCH_TEXT} ILIKE ?", pattern)
        if self.ids:
            add("id = ANY(?::text[])", self.ids)
        if self.tags:
            add("tags @> ?::text[]", self.tags)
        if self.failed_step is not None:
            add("failed_step = ?", self.failed_step)
        if self.created_after is not None:
            add("created_at >= ?", self.created_after)
        if self.created_before is not None:
            add("created_at < ?", self.created_before)
        if self.exclude_ids:
            add("NOT (id = ANY(?::text[]))", self.exclude_ids)
        if self.bulk_operation_id is not None:
            add("bulk_operation_id = ?", self.bulk_operation_id)
        if self.retry_of is not None:
            add("retry_of = ?", self.retry_of)  # runs_retry_of_idx
        if not self.include_archived:
            clauses.append("NOT archived")
        return clauses, args


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


STEP_COLUMNS = (
    "step", "position", "action", "status", "attempt", "input", "output", "error", "assertions", "extractions",
    "started_at", "finished_at", "duration_ms", "reused_from", "reason",
)  # fmt: skip
ATTEMPT_COLUMNS = (
    "step", "attempt", "status", "error", "retry_at", "started_at", "finished_at", "duration_ms", "output",
)  # fmt: skip


def _rows(table: str, alias: str, columns: tuple[str, ...], order: str) -> str:
    """The run's rows of `table` as one array of anonymous records (tuples in `columns` order)."""
    fields = ", ".join(f"{alias}.{c}" for c in columns)
    return f"ARRAY(SELECT ROW({fields}) FROM {table} {alias} WHERE {alias}.run_id = r.id ORDER BY {order})"


RETRY_COLUMNS = ("id", "retry_strategy", "status", "created_at")

# GET /v1/runs/{id} in one round trip: the run, its steps and attempts, the flow version it ran, its retries
# (runs_retry_of_idx) and, while it is paused, the request a human must answer. The children are read only when
# the run is the caller's.
_DETAIL = (
    f"SELECT {', '.join('r.' + c for c in SUMMARY_COLUMNS)}, r.tenant_id, r.trigger_payload, r.error, "
    f"r.cursor_window, {', '.join(f'r.records_{n}' for n in RECORD_COUNTERS)}, "
    f"{_rows('run_steps', 's', STEP_COLUMNS, 's.position')} AS steps, "
    f"{_rows('step_attempts', 'a', ATTEMPT_COLUMNS, 'a.step, a.attempt')} AS attempts, "
    f"r.retry_strategy, ARRAY(SELECT ROW({', '.join('x.' + c for c in RETRY_COLUMNS)}) FROM runs x "
    " WHERE x.retry_of = r.id AND x.tenant_id = r.tenant_id AND x.environment = r.environment "
    " ORDER BY x.created_at, x.id) AS retries, "
    "(SELECT f.definition FROM flow_versions f "
    " WHERE f.tenant_id = r.tenant_id AND f.flow_id = r.flow_id AND f.version = r.flow_version) AS flow, "
    "CASE WHEN r.status = 'PAUSED' THEN (SELECT e.payload FROM run_events e "
    " WHERE e.run_id = r.id AND e.type = 'RunPaused' ORDER BY e.seq DESC LIMIT 1) END AS waiting_for "
    "FROM runs r WHERE r.id = $1 AND r.tenant_id = $2 AND r.environment = $3"
)


async def get_run_detail(pool: asyncpg.Pool, tenant_id: str, environment: str, run_id: str) -> asyncpg.Record | None:
    """The run as `get_run` returns it plus `steps` and `attempts` (tuples in STEP_COLUMNS / ATTEMPT_COLUMNS
    order, by position and by step and attempt), `retry_strategy`, `retries` (tuples in RETRY_COLUMNS order,
    oldest first), `flow` (the definition of the version it ran) and
    `waiting_for` (the payload of the latest RunPaused while the run is PAUSED)."""
    return await pool.fetchrow(_DETAIL, run_id, tenant_id, environment)


async def get_events(pool: asyncpg.Pool, run_id: str, after_seq: int, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT seq, event_id, type, occurred_at, causation_id, payload FROM run_events "
        "WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        run_id, after_seq, limit,
    )  # fmt: skip


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
    return await pool.fetch(
        "SELECT seq, level, step, message, fields, occurred_at FROM run_logs "
        "WHERE run_id = $1 AND seq > $2 AND (cardinality($3::text[]) = 0 OR level = ANY($3::text[])) "
        "AND ($4::text IS NULL OR step = $4) ORDER BY seq LIMIT $5",
        run_id, after_seq, levels, step, limit,
    )  # fmt: skip


async def get_record_errors(
    pool: asyncpg.Pool, run_id: str, step: str | None, after_seq: int, limit: int
) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT seq, step, record_key, field_path, error, raw_error, occurred_at FROM record_errors "
        "WHERE run_id = $1 AND seq > $2 AND ($3::text IS NULL OR step = $3) ORDER BY seq LIMIT $4",
        run_id, after_seq, step, limit,
    )  # fmt: skip
