"""Record events of a sync_records step and their payloads: counters, rejected records, canonical upserts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import Field

from schemas.events.common import EventBase
from schemas.flows import Frozen

# ---------------------------------------------------------------- payloads


class RecordCounts(Frozen):
    """What a sync_records step counted; a run's `records` adds up every step's counts, counter by counter."""

    read: int = 0
    transformed: int = 0
    written: int = 0
    deduped: int = 0
    skipped: int = 0
    failed: int = 0


RECORD_COUNTERS: tuple[str, ...] = tuple(RecordCounts.model_fields)


class RecordsProcessedPayload(RecordCounts):
    step: str


class RecordFailedPayload(Frozen):
    step: str
    record_key: str
    field_path: str | None = None
    error: str
    raw_error: Any = None


CanonicalEntity = Literal[
    "customer", "contact", "account", "lead", "opportunity", "product", "product_variant", "order",
    "order_line_item", "invoice", "payment", "subscription", "refund", "shipment", "inventory",
]  # fmt: skip

CANONICAL_ENTITIES: tuple[str, ...] = get_args(CanonicalEntity)


class CanonicalRecord(Frozen):
    """One normalised record as a sync step wrote it; its external ids (source to id) deduplicate it."""

    external_ids: dict[str, str] = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    source_updated_at: datetime | None = None


class RecordsUpsertedPayload(Frozen):
    step: str
    entity: CanonicalEntity
    records: tuple[CanonicalRecord, ...]


# ---------------------------------------------------------------- events


class RecordsProcessed(EventBase):
    type: Literal["RecordsProcessed"] = "RecordsProcessed"
    payload: RecordsProcessedPayload


class RecordFailed(EventBase):
    type: Literal["RecordFailed"] = "RecordFailed"
    payload: RecordFailedPayload


class RecordsUpserted(EventBase):
    """Canonical records a sync step wrote, read by the data API (`/v1/data/...`)."""

    type: Literal["RecordsUpserted"] = "RecordsUpserted"
    payload: RecordsUpsertedPayload
