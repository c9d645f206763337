"""What every step runner shares: the call, its outcome, the classified error, JSON-safe and capped outputs."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.events import ErrorCategory, ErrorInfo
from services.common.failures import StepError

TRUNCATED = "…[truncated]"
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class StepCall:
    run_id: str
    step: str
    action: str
    attempt: int
    input: Any
    started_at: dt.datetime
    timeout_s: float
    # Resolved secrets (docs/secrets.md): replaced by `***` in the output before it is capped, so a preview cut
    # in the middle of one cannot keep a part of it.
    scrub: frozenset[str] = frozenset()
    # Whose step it is: the tenant's own connectors and secrets are the ones it may use.
    tenant_id: str = ""
    environment: str = "PRODUCTION"

    @property
    def idempotency_key(self) -> str:
        # Stable across redeliveries of the same attempt (invariant 4).
        return f"{self.run_id}:{self.step}:{self.attempt}"


@dataclass(frozen=True, slots=True)
class StepOutcome:
    ok: bool
    output: Any = None
    error: ErrorInfo | None = None
    duration_ms: float = 0


def parse_input(model: type[M], value: Any, action: str) -> M:
    """The rendered step input as the action's model; a bad one fails the step as VALIDATION, naming the field."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors())
        raise StepError(ErrorCategory.VALIDATION, f"{action} input: {problems}", code="invalid_input",
                        field_path=path or None) from exc  # fmt: skip


def json_safe(value: Any, fallback: Callable[[Any], Any] | None = None) -> Any:
    """Plain JSON values only, so live state and state replayed from the ledger are equal.

    Decimals stay numbers when a float holds them exactly, else become strings; times become ISO 8601;
    bytes become Postgres-style `\\x` hex. Other types go through `fallback`, or raise TypeError.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, fallback) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, fallback) for v in value]
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value() and abs(value) < 2**63:
            return int(value)
        as_float = float(value)
        return as_float if value.is_finite() and Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Enum):
        return json_safe(value.value, fallback)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value), fallback)
    if fallback is not None:
        return fallback(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def json_size(value: Any) -> int:
    return len(orjson.dumps(value))


def cap_output(value: Any, max_bytes: int) -> Any:
    """`value` itself, or when its JSON is larger than `max_bytes` a preview of it with a truncation marker."""
    encoded = orjson.dumps(value)
    if len(encoded) <= max_bytes:
        return value
    preview = encoded[:max_bytes].decode(errors="ignore")
    return {"truncated": True, "size_bytes": len(encoded), "preview": preview + TRUNCATED}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
