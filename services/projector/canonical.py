"""RecordsUpserted → canonical records, deduplicated by external ids. Pure: the store loads and saves.

The result depends only on the set of updates, never on the order they are applied in (a replay
interleaves partitions differently from the live projector, and the two must compare equal):
- records whose external ids link them form one canonical record, whose id is the smallest of the
  uuid5s of all those external ids;
- each field (and each source's external id) holds the value of the newest update that had it, newest
  by (source update time, event time, run id);
- created_at is the earliest update, updated_at and last_run_id the latest.
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
Stamp = list[str]  # [source update time or event time, event time, run id], ISO strings compare in order


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
    stamps: dict[str, Stamp] = field(default_factory=dict)  # "f:<field>" / "x:<source>" → stamp


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


def _id_of(scope: Scope, source: str, external: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x00".join((*scope, source, external))))


def new_canonical_id(scope: Scope, record: CanonicalRecord) -> str:
    return min(_id_of(scope, s, x) for s, x in record.external_ids.items())


def _as_row(u: Upsert) -> Canonical:
    r = u.record
    stamp: Stamp = [(r.source_updated_at or u.occurred_at).isoformat(), u.occurred_at.isoformat(), u.run_id]
    stamps = {f"f:{k}": stamp for k in r.data} | {f"x:{s}": stamp for s in r.external_ids}
    return Canonical(u.scope, new_canonical_id(u.scope, r), dict(r.external_ids), dict(r.data), r.source_updated_at,
                     u.occurred_at, u.occurred_at, u.run_id, stamps)  # fmt: skip


def combine(a: Canonical, b: Canonical, canonical_id: str) -> Canonical:
    """Commutative and associative: field by field, the newest stamp wins."""
    stamps: dict[str, Stamp] = {}
    data: dict[str, Any] = {}
    ids: dict[str, str] = {}
    for key in sorted(a.stamps.keys() | b.stamps.keys()):
        sa, sb = a.stamps.get(key), b.stamps.get(key)
        src = a if sb is None or (sa is not None and sa >= sb) else b
        stamps[key] = src.stamps[key]
        kind, name = key.split(":", 1)
        if kind == "f":
            data[name] = src.data[name]
        else:
            ids[name] = src.external_ids[name]
    stamps_known = [s for s in (a.last_source_update_at, b.last_source_update_at) if s is not None]
    newest = max((a.updated_at, a.last_run_id), (b.updated_at, b.last_run_id))
    return Canonical(a.scope, canonical_id, ids, data, max(stamps_known) if stamps_known else None,
                     min(a.created_at, b.created_at), newest[0], newest[1], stamps)  # fmt: skip


def merge(upserts: list[Upsert], mappings: dict[IdKey, str], existing: dict[tuple[Scope, str], Canonical]) -> Merged:
    """Apply upserts on top of the stored mappings and the rows they point at."""
    out = Merged()
    ids = dict(mappings)
    rows = dict(existing)
    for u in upserts:
        incoming = _as_row(u)
        found = {ids[k] for k in id_keys(u) if k in ids}
        target = min(found | {incoming.canonical_id})
        row = incoming
        for other in sorted(found):
            linked = rows.pop((u.scope, other), None)
            out.rows.pop((u.scope, other), None)
            if linked is not None:
                row = combine(row, linked, target)
            if other != target:
                out.deleted.add((u.scope, other))  # merged into the target
        row = combine(row, row, target)  # settles the id when nothing was found
        rows[(u.scope, target)] = out.rows[(u.scope, target)] = row
        out.deleted.discard((u.scope, target))
        for source, external in row.external_ids.items():
            ids[(*u.scope, source, external)] = out.mappings[(*u.scope, source, external)] = target
    return out
