"""A projector batch's transaction, opened and committed by hand so that BEGIN travels with the swap guard and COMMIT
with the offsets (docs/decisions.md, "A projector batch in few round trips"), and the guard against a rebuild's swap."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from services.common.db import quote_literal

log = logging.getLogger(__name__)

# The offsets, and when the batch wrote events the notice live streams in the API wake up on (delivered on commit,
# so they read what this batch wrote), sent with the COMMIT as one text of statements: one round trip. Such a text
# takes no parameters, so its values are literals (integers, and names quoted by quote_literal).
_SAVE_OFFSETS = """
INSERT INTO projector_offsets (consumer_group, topic, partition, next_offset, updated_at) VALUES {values}
ON CONFLICT (consumer_group, topic, partition) DO UPDATE
SET next_offset = GREATEST(projector_offsets.next_offset, EXCLUDED.next_offset), updated_at = now();
"""
_NOTIFY = "SELECT pg_notify('flowtrail_projected', current_schema());\n"
# The batch's first round trip: BEGIN, and with a guard the swap lock and the schema check
# (migration 0030_projector_batch_guard.sql), which raises SQLSTATE FT001 when a rebuild replaced the schema.
_SWAPPED = "FT001"


class SchemaSwapped(Exception):
    """`flowtrail projector rebuild` replaced the schema this projector was writing to."""


@dataclass(frozen=True, slots=True)
class SchemaGuard:
    """The schema a projector writes to, by name and by the oid it had when the projector connected."""

    name: str
    oid: int

    @property
    def lock_key(self) -> str:
        return swap_lock_key(self.name)


def swap_lock_key(schema: str) -> str:
    # Batches hold it shared; a rebuild's swap holds it exclusively, so no batch straddles a swap.
    return f"flowtrail-projector:{schema}"


async def schema_oid(conn: asyncpg.Connection, schema: str) -> int:
    oid = await conn.fetchval("SELECT oid FROM pg_namespace WHERE nspname = $1", schema)
    if oid is None:
        raise LookupError(f"schema {schema!r} does not exist")
    return int(oid)


def begin_text(guard: SchemaGuard | None) -> str:
    if guard is None:
        return "BEGIN"
    return (f"BEGIN; SELECT projector_batch_guard({quote_literal(guard.lock_key)}, {quote_literal(guard.name)}, "
            f"{int(guard.oid)})")  # fmt: skip


async def open_transaction(conn: asyncpg.Connection, sql: str, guard: SchemaGuard | None) -> None:
    """Sends a text that opens the batch's transaction (`begin_text`); a failed one leaves no transaction open."""
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        await rollback(conn)
        if exc.sqlstate == _SWAPPED and guard is not None:
            raise SchemaSwapped(guard.name) from exc
        raise
    except BaseException:
        await rollback(conn)
        raise


def commit_text(group: str, positions: Iterable[tuple[str, int, int]], *, notify: bool) -> str:
    """The batch's last round trip: its offsets (the next offset to read per partition), the notice, COMMIT."""
    last: dict[tuple[str, int], int] = {}
    for topic, partition, offset in positions:
        last[(topic, partition)] = max(last.get((topic, partition), -1), offset)
    sql = ""
    if last:
        values = ", ".join(
            f"({quote_literal(group)}, {quote_literal(topic)}, {int(partition)}, {int(offset) + 1}, now())"
            for (topic, partition), offset in last.items()
        )
        sql = _SAVE_OFFSETS.format(values=values)
    if notify:
        sql += _NOTIFY
    return sql + "COMMIT"


async def rollback(conn: asyncpg.Connection) -> None:
    """After a failure inside the batch: end its transaction if the connection is still in one. A connection that
    broke is left to the caller, which drops it."""
    if conn.is_closed() or not conn.is_in_transaction():
        return
    try:
        await conn.execute("ROLLBACK")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        log.warning("ROLLBACK of a failed projector batch failed; the connection is dropped by its owner")
