"""GET /api/public/data/{entity} and /{entity}/{id}: the canonical read API (docs/projector.md; scope data:read)."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from fastapi import APIRouter, Query, Request

from schemas.events import CANONICAL_ENTITIES
from services.api.adapters import data as store
from services.api.models.data import CanonicalRecord, CanonicalRecords
from services.api.routes import DataReader
from services.common.contract import Timestamp
from services.common.cursor import TIME_AND_ID
from services.common.http import ApiError

router = APIRouter()


def _entity(entity: str) -> str:
    if entity not in CANONICAL_ENTITIES:
        raise ApiError(404, "not_found", f"no entity {entity!r}; entities: {', '.join(CANONICAL_ENTITIES)}")
    return entity


def _record(row: asyncpg.Record, fields: list[str] | None) -> CanonicalRecord:
    full = {
        "canonical_id": row["canonical_id"],
        **row["data"],
        "external_ids": row["external_ids"],
        "last_source_update_at": row["last_source_update_at"],
        "updated_at": row["updated_at"],
    }
    if fields is None:
        return CanonicalRecord(**full)
    return CanonicalRecord(**{"canonical_id": row["canonical_id"], **{f: full[f] for f in fields if f in full}})


@router.get("/api/public/data/{entity}", response_model_exclude_unset=True)
async def list_records(
    entity: str,
    request: Request,
    principal: DataReader,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    updated_since: Timestamp | None = None,
    fields: str | None = None,
) -> CanonicalRecords:
    """Normalised, deduplicated records, oldest update first; pass `next_cursor` back as `cursor` until null."""
    since = updated_since
    wanted = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
    rows = await store.list_records(
        request.app.state.pool, principal.tenant_id, principal.environment, _entity(entity), limit, since,
        TIME_AND_ID.decode(cursor) if cursor else None,
    )  # fmt: skip
    page = rows[:limit]
    more = len(rows) > limit
    return CanonicalRecords(
        entity=entity,
        count=len(page),
        next_cursor=TIME_AND_ID.encode((page[-1]["updated_at"], page[-1]["canonical_id"])) if more else None,
        data=[_record(r, wanted) for r in page],
    )


@router.get("/api/public/data/{entity}/{canonical_id}", response_model_exclude_unset=True)
async def get_record(entity: str, canonical_id: str, request: Request, principal: DataReader) -> CanonicalRecord:
    row = await store.get_record(
        request.app.state.pool, principal.tenant_id, principal.environment, _entity(entity), canonical_id
    )
    if row is None:
        raise ApiError(404, "not_found", f"no {entity} with canonical_id {canonical_id!r}")
    return _record(row, None)
