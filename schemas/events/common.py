"""What events, triggers and commands share: ids, the clock, trigger and error shapes (docs/architecture.md#events).

Every model here is `Frozen` (schemas/flows.py): immutable, and an unknown field fails where the model is built;
stored records are read with unknown fields ignored (schemas/codec.py, docs/decisions.md#unknown-fields).
"""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from schemas.flows import Frozen


def new_id() -> str:
    return uuid.uuid4().hex


def new_run_id() -> str:
    """`run_<ms since epoch, hex><64 random bits>`: time-ordered, so ids sort roughly by creation and index
    inserts stay local."""
    return f"run_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class TriggerType(StrEnum):
    SCHEDULE = "schedule"
    WEBHOOK = "webhook"
    MANUAL = "manual"
    API = "api"
    KAFKA = "kafka"
    RETRY = "retry"
    SUBFLOW = "subflow"


class ExecutionMode(StrEnum):
    LIVE = "live"
    ASYNC = "async"
    SCHEDULE = "schedule"


class ErrorCategory(StrEnum):
    TRANSIENT = "TRANSIENT"
    AUTH = "AUTH"
    VALIDATION = "VALIDATION"
    CONFLICT = "CONFLICT"
    INTERNAL = "INTERNAL"


class ErrorInfo(Frozen):
    category: ErrorCategory
    message: str
    code: str | None = None
    status_code: int | None = None
    field_path: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class RetryStrategy(StrEnum):
    FROM_FAILED_STEP = "FROM_FAILED_STEP"
    ON_LATEST_VERSION = "ON_LATEST_VERSION"


class CursorWindow(Frozen):
    """The `updated_since` / `updated_until` bounds a syncing run reads (docs/runs.md); a retry reads the same."""

    updated_since: datetime | None = None
    updated_until: datetime


class ReusedStep(Frozen):
    """What a step a FROM_FAILED_STEP retry does not run again recorded where it ran; its output is in `reuse`."""

    # The run in which the step ran: the first run of a retry chain that executed it, not a retry that reused it.
    run_id: str
    input: Any = None
    extractions: dict[str, Any] = Field(default_factory=dict)


class TriggerInfo(Frozen):
    type: TriggerType
    caller: str | None = None  # API key id or user that fired it
    # A manual trigger: the name its key had then, so the run says who even after the key is renamed or deleted.
    caller_name: str | None = None
    payload: Any = None
    # A webhook delivery's request headers, credentials and signatures masked (docs/intake.md#webhook-triggers).
    headers: dict[str, str] | None = None


class EventBase(Frozen):
    """The envelope of every ledger event (docs/architecture.md#events)."""

    # Narrowed by every event class: `type` to its name, `payload` to its payload model.
    type: str
    payload: Any
    event_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    tenant_id: str
    run_id: str
    flow_id: str
    flow_version: int
    seq: int = Field(ge=0)
    occurred_at: datetime = Field(default_factory=utcnow)
    causation_id: str
    correlation_id: str
