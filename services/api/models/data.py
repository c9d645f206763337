"""Canonical records (GET /api/public/data/{entity})."""

from __future__ import annotations

from datetime import datetime

from services.api.models import JSON, Open, Out


class CanonicalRecord(Open):
    """The entity's normalised fields (free-form per entity) next to these; `fields=` picks some."""

    canonical_id: str
    external_ids: JSON = None
    last_source_update_at: datetime | None = None
    updated_at: datetime | None = None


class CanonicalRecords(Out):
    entity: str
    count: int
    next_cursor: str | None
    data: list[CanonicalRecord]
