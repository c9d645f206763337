"""The SQL behind the runs API. Every query takes the caller's tenant and environment (DESIGN 2.7)."""

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
)  # fmt: skip
_SELECT_SUMMARY = ", ".join(SUMMARY_COLUMNS)


class CursorError(ValueError):
    """A cursor this API did not hand out, or one from another query."""


@dataclass(frozen=True)
class Cursor:
    """A position in the newest-first order: the (created_at, id) of a row and which way to read from it."""

    created_at: datetime
    run_id: str
    backward: bool = False

    def encode(self) -> str:
        raw = orjson.dumps({"c": self.created_at.isoformat(), "i": self.run_id, "b": self.backward})
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            return cls(datetime.fromisoformat(raw["c"]), str(raw["i"]), bool(raw["b"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CursorError("cursor is not one this API returned") from exc


@dataclass
class RunFilter:
    tenant_id: str
    environment: str
    flow_ids: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    trigger_types: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    failed_step: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    include_archived: bool = False

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
        if not self.include_archived:
            clauses.append("NOT archived")
        return clauses, args


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    next_cursor: str | None
    prev_cursor: str | None


async def list_runs(pool: asyncpg.Pool, flt: RunFilter, limit: int, cursor: Cursor | None) -> Page:
    """Newest first, keyset-paginated on (created_at, id): pages stay stable while new runs arrive."""
    clauses, args = flt.where()
    if cursor is not None:
        args += [cursor.created_at, cursor.run_id]
        op = ">" if cursor.backward else "<"
        clauses.append(f"(created_at, id) {op} (${len(args) - 1}, ${len(args)})")
    order = "ASC" if cursor is not None and cursor.backward else "DESC"
    args.append(limit + 1)
    sql = (
        f"SELECT {_SELECT_SUMMARY} FROM runs WHERE {' AND '.join(clauses)} "
        f"ORDER BY created_at {order}, id {order} LIMIT ${len(args)}"
    )
    rows = await pool.fetch(sql, *args)
    more = len(rows) > limit
    rows = rows[:limit]
    if cursor is not None and cursor.backward:
        rows.reverse()
        has_newer, has_older = more, True
    else:
        has_newer, has_older = cursor is not None, more
    if not rows:
        # An empty page still lets the client turn back the way it came.
        if cursor is None:
            return Page([], None, None)
        back = Cursor(cursor.created_at, cursor.run_id, not cursor.backward).encode()
        return Page([], back if cursor.backward else None, None if cursor.backward else back)
    first, last = rows[0], rows[-1]
    return Page(
        rows,
        Cursor(last["created_at"], last["id"]).encode() if has_older else None,
        Cursor(first["created_at"], first["id"], backward=True).encode() if has_newer else None,
    )


async def get_run(pool: asyncpg.Pool, tenant_id: str, environment: str, run_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_SELECT_SUMMARY}, trigger_payload, error FROM runs "
        "WHERE id = $1 AND tenant_id = $2 AND environment = $3",
        run_id, tenant_id, environment,
    )  # fmt: skip


async def get_steps(pool: asyncpg.Pool, run_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT step, position, action, status, attempt, input, output, error, assertions, extractions, "
        "started_at, finished_at, duration_ms FROM run_steps WHERE run_id = $1 ORDER BY position",
        run_id,
    )


async def get_events(pool: asyncpg.Pool, run_id: str, after_seq: int, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT seq, event_id, type, occurred_at, causation_id, payload FROM run_events "
        "WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        run_id, after_seq, limit,
    )  # fmt: skip
