"""What the HTTP services promise their callers, shared by the API and ingest: the error envelope and its
documented answers, the bounds of numbers that reach PostgreSQL or Kafka, and the one timestamp rule.

docs/api-contract.md describes the rules; this module is where they are enforced and documented (OpenAPI).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

# Column ranges: flow versions and a run's event, log and record-error sequence numbers are `integer`. Kafka
# payloads are encoded with orjson, which refuses integers outside 64 bits, so JSON bodies are held to int64.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


# ---------------------------------------------------------------- the error envelope


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(
        description="stable, machine-readable: invalid_request, unauthorized, forbidden, not_found, conflict, "
        "payload_too_large, validation_error, rate_limited, kafka_unavailable, internal_error",
        examples=["validation_error"],
    )
    message: str = Field(description="what is wrong, naming the parameter or field", examples=["limit: ..."])
    request_id: str = Field(description="the X-Request-Id of the request: quote it when reporting a problem")
    details: dict[str, Any] | None = Field(
        default=None, description="machine-readable facts about some failures (e.g. which inputs were appended)"
    )


class ErrorEnvelope(BaseModel):
    """Every error answer of every Flowtrail service."""

    model_config = ConfigDict(extra="forbid", title="ErrorEnvelope")

    error: ErrorBody


_INT = {"type": "integer"}
_RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "requests allowed per window", "schema": _INT},
    "X-RateLimit-Remaining": {"description": "requests left in the window", "schema": _INT},
    "X-RateLimit-Reset": {"description": "unix seconds: window end, or when to retry", "schema": _INT},
}
ERROR_DESCRIPTIONS = {
    400: "malformed request: bad JSON, a NUL byte or lone surrogate in a path, query, header or body, a bad cursor",
    401: "missing, invalid, expired or revoked API key",
    403: "the key lacks the scope, or names another environment or tenant",
    404: "no such resource in the key's tenant and environment",
    409: "the resource's state does not allow this (see the message)",
    413: "body too large",
    422: "a parameter or field is invalid or unknown (the message names it)",
    429: "rate limit exceeded; retry after `Retry-After` seconds",
    503: "a dependency (Kafka, PostgreSQL) is unavailable; retry with backoff",
}
_WRITES = frozenset({"post", "put", "patch", "delete"})
SCOPE_ATTRIBUTE = "flowtrail_scope"  # set on require_scope's dependencies: the route is authenticated


def _route_scope(dependant: Any) -> str | None:
    for sub in getattr(dependant, "dependencies", []):
        scope = getattr(sub.call, SCOPE_ATTRIBUTE, None) or _route_scope(sub)
        if scope:
            return str(scope)
    return None


def error_statuses(method: str, path: str, has_body: bool) -> list[int]:
    """The errors an authenticated operation can answer, by the rules every route follows (docs/api-contract.md)."""
    statuses = [400, 401, 403, 422, 429]
    if "{" in path:
        statuses.append(404)
    if method in _WRITES:
        statuses += [409, 503]
    if has_body:
        statuses.append(413)
    return sorted(statuses)


def _error_response(status: int) -> dict[str, Any]:
    headers: dict[str, Any] = {} if status == 401 else dict(_RATE_HEADERS)
    if status == 429:
        headers["Retry-After"] = {"description": "seconds until a retry may be admitted", "schema": _INT}
    out: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
    }
    if headers:
        out["headers"] = headers
    return out


def _flat(routes: list[Any]) -> list[Any]:
    """The app's routes with included routers opened (FastAPI keeps an included router as one entry)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _flat(inner.routes) if inner is not None else [route]
    return out


def document(routes: list[Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Completes a FastAPI OpenAPI document with the contract every service keeps: the bearer scheme on each
    authenticated operation, and every error it can answer as one ErrorEnvelope (replacing FastAPI's own 422)."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(envelope.pop("$defs", {}))
    schemas["ErrorEnvelope"] = envelope
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key, `ft_live_…` (PRODUCTION) or `ft_test_…` (TESTING)",
    }
    paths = schema.get("paths", {})
    for route in _flat(routes):
        scope = _route_scope(getattr(route, "dependant", None))
        for method in getattr(route, "methods", ()) or ():
            operation = paths.get(getattr(route, "path", ""), {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if scope is None:
                continue
            operation["security"] = [{"bearer": []}]
            note = (
                "Needs the deployment's operator key (FLOWTRAIL_API_OPERATOR_KEY), not a tenant's API key."
                if scope == "operator"
                else f"Needs the `{scope}` scope (or `admin`)."
            )
            operation["description"] = f"{operation.get('description', '').rstrip()}\n\n{note}".lstrip()
            for status in error_statuses(method.lower(), route.path, "requestBody" in operation):
                responses.setdefault(str(status), _error_response(status))
            for code, response in responses.items():
                if code.startswith("2"):
                    response.setdefault("headers", {}).update(_RATE_HEADERS)
    return schema


# ---------------------------------------------------------------- timestamps: RFC 3339 with an offset, everywhere

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")
TIMESTAMP_HINT = "expected an RFC 3339 timestamp with an offset, e.g. 2026-01-01T00:00:00Z"


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError(TIMESTAMP_HINT)
    return value


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range once converted to UTC") from None


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_utc)]
"""A timestamp parameter or field: RFC 3339 with `Z` or `±hh:mm` (no naive times, no unix numbers), in UTC."""


def parse_timestamp(text: str) -> datetime:
    """The same rule for values parsed by hand (`as_of`, `Last-Event-ID`); ValueError says what is expected."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(TIMESTAMP_HINT)
    try:
        value = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00").replace("t", "T"))
    except ValueError:
        raise ValueError(TIMESTAMP_HINT) from None
    return _in_utc(value)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


AnyCase = BeforeValidator(_lower)
"""For an enumeration documented in lower case: the value is accepted in any case (`?status=OPEN`)."""


def parse_count(text: str, maximum: int = INT32_MAX) -> int:
    """A non-negative decimal up to `maximum` (a column's range); ValueError otherwise (`isdigit` alone takes '²'
    and 10**30)."""
    if not (text.isascii() and text.isdigit()) or int(text) > maximum:
        raise ValueError(f"expected a whole number from 0 to {maximum}")
    return int(text)
