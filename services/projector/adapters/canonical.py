"""Loads the canonical rows and id mappings a batch's RecordsUpserted events touch, merges, writes back."""

from __future__ import annotations

from typing import Any

import asyncpg

from schemas import codec
from schemas.events import EventBase
from services.projector.canonical import Canonical, IdKey, Scope, Upsert, id_keys, merge


def _json(value: Any) -> str:
    return codec.dumps(value).decode()


async def write_canonical(conn: asyncpg.Connection, events: list[EventBase], envs: dict[str, str]) -> None:
    """`envs`: each run's environment (a record belongs to the environment of the run that wrote it)."""
    if not events:
        return
    upserts = [
        Upsert((e.tenant_id, envs.get(e.run_id, "PRODUCTION"), e.payload.entity), record, e.occurred_at, e.run_id)
        for e in events
        for record in e.payload.records
    ]
    keys = {k for u in upserts for k in id_keys(u)}
    cols = list(zip(*keys, strict=True))
    mapped = await conn.fetch(
        """
        SELECT m.tenant_id, m.environment, m.entity, m.source, m.external_id, m.canonical_id
        FROM canonical_external_ids m
        JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS k(t, e, n, s, x)
          ON (m.tenant_id, m.environment, m.entity, m.source, m.external_id) = (k.t, k.e, k.n, k.s, k.x)
        """,
        *[list(c) for c in cols],
    )
    mappings: dict[IdKey, str] = {
        (r["tenant_id"], r["environment"], r["entity"], r["source"], r["external_id"]): r["canonical_id"]
        for r in mapped
    }
    wanted = {(k[:3], v) for k, v in mappings.items()}
    existing: dict[tuple[Scope, str], Canonical] = {}
    if wanted:
        w = list(wanted)
        for r in await conn.fetch(
            """
            SELECT c.* FROM canonical_records c
            JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k(t, e, n, i)
              ON (c.tenant_id, c.environment, c.entity, c.canonical_id) = (k.t, k.e, k.n, k.i)
            """,
            [s[0] for s, _ in w], [s[1] for s, _ in w], [s[2] for s, _ in w], [i for _, i in w],
        ):  # fmt: skip
            scope = (r["tenant_id"], r["environment"], r["entity"])
            existing[(scope, r["canonical_id"])] = Canonical(
                scope, r["canonical_id"], r["external_ids"], r["data"], r["last_source_update_at"], r["created_at"],
                r["updated_at"], r["last_run_id"], r["field_stamps"],
            )  # fmt: skip
    merged = merge(upserts, mappings, existing)
    if merged.deleted:
        d = list(merged.deleted)
        await conn.execute(
            """
            DELETE FROM canonical_records c
            USING unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k(t, e, n, i)
            WHERE (c.tenant_id, c.environment, c.entity, c.canonical_id) = (k.t, k.e, k.n, k.i)
            """,
            [s[0] for s, _ in d], [s[1] for s, _ in d], [s[2] for s, _ in d], [i for _, i in d],
        )  # fmt: skip
    rows = list(merged.rows.values())
    await conn.execute(
        """
        INSERT INTO canonical_records (tenant_id, environment, entity, canonical_id, external_ids, data,
                                       last_source_update_at, created_at, updated_at, last_run_id, field_stamps)
        SELECT t, e, n, i, x::jsonb, d::jsonb, s, c, u, r, f::jsonb
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[],
                    $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[])
             AS k(t, e, n, i, x, d, s, c, u, r, f)
        ON CONFLICT (tenant_id, environment, entity, canonical_id) DO UPDATE SET
            external_ids = EXCLUDED.external_ids, data = EXCLUDED.data,
            last_source_update_at = EXCLUDED.last_source_update_at, created_at = EXCLUDED.created_at,
            updated_at = EXCLUDED.updated_at, last_run_id = EXCLUDED.last_run_id, field_stamps = EXCLUDED.field_stamps
        """,
        [r.scope[0] for r in rows], [r.scope[1] for r in rows], [r.scope[2] for r in rows],
        [r.canonical_id for r in rows], [_json(r.external_ids) for r in rows], [_json(r.data) for r in rows],
        [r.last_source_update_at for r in rows], [r.created_at for r in rows], [r.updated_at for r in rows],
        [r.last_run_id for r in rows], [_json(r.stamps) for r in rows],
    )  # fmt: skip
    m = list(merged.mappings.items())
    await conn.execute(
        """
        INSERT INTO canonical_external_ids (tenant_id, environment, entity, source, external_id, canonical_id)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
        ON CONFLICT (tenant_id, environment, entity, source, external_id) DO UPDATE
            SET canonical_id = EXCLUDED.canonical_id
        """,
        [k[0] for k, _ in m], [k[1] for k, _ in m], [k[2] for k, _ in m], [k[3] for k, _ in m],
        [k[4] for k, _ in m], [v for _, v in m],
    )  # fmt: skip
