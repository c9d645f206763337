"""RecordsUpserted → canonical records, deduplicated by external ids. Pure: the store loads and saves.

A record joins the canonical record that any of its external ids already points at; when its ids
point at two canonical records, those merge into the one with the smaller id. Fields from a newer
source update win; an older update only fills fields the record does not have yet. Timestamps come
from the events, so a rebuild produces the same rows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import CanonicalRecord

_NAMESPACE = uuid.UUID("5f0d3a7e-2c6b-4f31-9c3d-1a4e5b6c7d80")

Scope = tuple[str, str, str]  # tenant_id, environment, entity
IdKey = tuple[str, str, str, str, str]  # scope + (source, external_id)


@dataclass
class Canonical:
    scope: Scope
    canonical_id: str
    external_ids: dict[str, str]
    data: dict[str, Any]
    last_source_update_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_run_id: str


@dataclass(frozen=True)
class Upsert:
    scope: Scope
    record: CanonicalRecord
    occurred_at: datetime
    run_id: str


@dataclass
class Merged:
    """What to write back: rows to upsert, rows merged away, and id mappings to upsert."""

    rows: dict[tuple[Scope, str], Canonical] = field(default_factory=dict)
    deleted: set[tuple[Scope, str]] = field(default_factory=set)
    mappings: dict[IdKey, str] = field(default_factory=dict)


def id_keys(u: Upsert) -> list[IdKey]:
    return [(*u.scope, source, external) for source, external in sorted(u.record.external_ids.items())]


def new_canonical_id(scope: Scope, record: CanonicalRecord) -> str:
    source, external = min(record.external_ids.items())
    return str(uuid.uuid5(_NAMESPACE, "\x00".join((*scope, source, external))))


def _newer(a: datetime | None, b: datetime | None) -> bool:
    """Is an update stamped `a` at least as new as one stamped `b`? Unstamped updates count as newest."""
    return a is None or b is None or a >= b


def merge(upserts: list[Upsert], mappings: dict[IdKey, str], existing: dict[tuple[Scope, str], Canonical]) -> Merged:
    """Apply upserts in log order on top of the stored mappings and rows they touch."""
    out = Merged()
    ids = dict(mappings)
    rows = dict(existing)
    for u in upserts:
        keys = id_keys(u)
        found = sorted({ids[k] for k in keys if k in ids})
        target = found[0] if found else new_canonical_id(u.scope, u.record)
        row = rows.get((u.scope, target))
        for other in found[1:]:
            # This record links two canonical records: fold the other one into the target.
            gone = rows.pop((u.scope, other), None)
            out.rows.pop((u.scope, other), None)
            out.deleted.add((u.scope, other))
            if gone is not None:
                row = _combine(row, gone) if row is not None else _retarget(gone, target)
            for k, v in list(ids.items()):
                if v == other:
                    ids[k] = out.mappings[k] = target
        row = _apply(row, u, target)
        rows[(u.scope, target)] = out.rows[(u.scope, target)] = row
        out.deleted.discard((u.scope, target))
        for k in keys:
            ids[k] = out.mappings[k] = target
    return out


def _retarget(row: Canonical, canonical_id: str) -> Canonical:
    return Canonical(row.scope, canonical_id, dict(row.external_ids), dict(row.data), row.last_source_update_at,
                     row.created_at, row.updated_at, row.last_run_id)  # fmt: skip


def _combine(keep: Canonical, gone: Canonical) -> Canonical:
    newer, older = (keep, gone) if _newer(keep.last_source_update_at, gone.last_source_update_at) else (gone, keep)
    return Canonical(
        keep.scope, keep.canonical_id, {**older.external_ids, **newer.external_ids}, {**older.data, **newer.data},
        newer.last_source_update_at, min(keep.created_at, gone.created_at), max(keep.updated_at, gone.updated_at),
        keep.last_run_id if keep.updated_at >= gone.updated_at else gone.last_run_id,
    )  # fmt: skip


def _apply(row: Canonical | None, u: Upsert, canonical_id: str) -> Canonical:
    r = u.record
    if row is None:
        return Canonical(u.scope, canonical_id, dict(r.external_ids), dict(r.data), r.source_updated_at,
                         u.occurred_at, u.occurred_at, u.run_id)  # fmt: skip
    if _newer(r.source_updated_at, row.last_source_update_at):
        data, stamp = {**row.data, **r.data}, r.source_updated_at or row.last_source_update_at
    else:
        data, stamp = {**r.data, **row.data}, row.last_source_update_at
    return Canonical(row.scope, canonical_id, {**row.external_ids, **r.external_ids}, data, stamp, row.created_at,
                     max(row.updated_at, u.occurred_at), u.run_id)  # fmt: skip
