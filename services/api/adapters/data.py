"""The SQL behind /api/public/data: canonical records of one entity, oldest update first."""

from __future__ import annotations

from datetime import datetime

import asyncpg

_COLUMNS = "canonical_id, external_ids, data, last_source_update_at, updated_at"


async def list_records(
    pool: asyncpg.Pool,
    tenant_id: str,
    environment: str,
    entity: str,
    limit: int,
    updated_since: datetime | None,
    after: tuple[datetime, str] | None,
) -> list[asyncpg.Record]:
    return await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM canonical_records
        WHERE tenant_id = $1 AND environment = $2 AND entity = $3
          AND ($4::timestamptz IS NULL OR updated_at >= $4)
          AND ($5::timestamptz IS NULL OR (updated_at, canonical_id) > ($5, $6))
        ORDER BY updated_at, canonical_id
        LIMIT $7
        """,
        tenant_id, environment, entity, updated_since, after[0] if after else None, after[1] if after else "",
        limit + 1,
    )  # fmt: skip


async def get_record(
    pool: asyncpg.Pool, tenant_id: str, environment: str, entity: str, canonical_id: str
) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM canonical_records "
        "WHERE tenant_id = $1 AND environment = $2 AND entity = $3 AND canonical_id = $4",
        tenant_id, environment, entity, canonical_id,
    )  # fmt: skip
