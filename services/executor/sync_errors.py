"""`sync_records`, the pure reading of failures: which HTTP statuses fail the whole step, and what a destination's
refusal of one record says — the field it names and its message in the common JSON error shapes, the raw answer or
PostgreSQL error as the user needs to see it. The I/O that meets them is `adapters/sync_http.py` and
`adapters/sync_postgres.py`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jmespath
import orjson

from schemas.events import ErrorCategory
from schemas.flows import mask_secrets, mask_text
from services.common.failures import StepError
from services.executor.adapters.actions_base import TRUNCATED

RAW_ERROR_BYTES = 2048


def http_category(status: int) -> ErrorCategory | None:
    """A status that fails the whole step, or None for a per-record refusal (other 4xx): an auth failure or a
    destination that is down or throttling fails every record alike, so the step fails (and a retry may fix it)."""
    if status in (401, 403, 407):
        return ErrorCategory.AUTH
    if status in (408, 425, 429) or status >= 500:
        return ErrorCategory.TRANSIENT
    return None


def error_field_path(body: Any) -> str | None:
    """The field a destination's JSON error names: `error.field`, `error.path`, `errors[0].field`, FastAPI's loc…"""
    for expression in _FIELD_PATHS:
        found = jmespath.search(expression, body) if isinstance(body, dict) else None
        if isinstance(found, list) and found and all(isinstance(p, str | int) for p in found):
            parts = [str(p) for p in found]
            return ".".join(parts[1:] if parts[0] in ("body", "query") and len(parts) > 1 else parts)
        if isinstance(found, str | int) and not isinstance(found, bool) and str(found):
            return str(found)
    return None


# NetSuite's REST API (a common destination of order syncs) answers RFC 9457 problem details with its own
# `o:errorDetails` list: `{"o:errorDetails": [{"detail": "Please enter value(s) for: Email",
# "o:errorPath": "email", "o:errorCode": "USER_ERROR"}]}`.
_NETSUITE = '"o:errorDetails"[0]'
_FIELD_PATHS = (
    *(f"{base}.{name}"
      for base in ("error", "errors[0]", "error.details[0]", "error.errors[0]", "detail[0]", "@")
      for name in ("field", "path", "field_path", "pointer", "loc")),
    f'{_NETSUITE}."o:errorPath"',
)  # fmt: skip
_MESSAGES = ("error.message", "errors[0].message", "detail[0].msg", f"{_NETSUITE}.detail", "message", "detail", "error")


def error_message(body: Any, status: int, reason: str) -> str:
    for expression in _MESSAGES:
        found = jmespath.search(expression, body) if isinstance(body, dict) else None
        if isinstance(found, str) and found:
            return mask_text(f"{status} {reason}: {found}")
    return f"{status} {reason}"


def raw_http_error(status: int, content: bytes, content_type: str) -> dict[str, Any]:
    """The destination's answer as the user needs to see it: status and body (JSON when it is), ~2 KB at most."""
    body: Any = None
    if "json" in content_type and len(content) <= RAW_ERROR_BYTES:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            body = None
    if body is None:
        text = content[:RAW_ERROR_BYTES].decode(errors="replace")
        body = text + (TRUNCATED if len(content) > RAW_ERROR_BYTES else "")
    return {"status": status, "body": mask_secrets(body)}


_ARGUMENT = re.compile(r"query argument \$(\d+)")


def pg_field(exc: Exception, columns: Sequence[str]) -> str | None:
    """The column a refusal names: the server's column_name, else the `$n` asyncpg could not bind."""
    column = getattr(exc, "column_name", None)
    if column:
        return str(column)
    match = _ARGUMENT.search(str(exc))
    return columns[int(match.group(1)) - 1] if match and 0 < int(match.group(1)) <= len(columns) else None


_PG_FIELDS = (("sqlstate", "sqlstate"), ("detail", "detail"), ("constraint", "constraint_name"),
              ("column", "column_name"), ("table", "table_name"))  # fmt: skip


def raw_pg_error(exc: Exception) -> dict[str, Any]:
    """The server's refusal as the user needs to see it: SQLSTATE, message, detail, constraint, column."""
    raw: dict[str, Any] = {name: getattr(exc, attr, None) for name, attr in _PG_FIELDS}
    raw["message"] = str(exc)
    raw = {k: v[:RAW_ERROR_BYTES] if isinstance(v, str) else v for k, v in raw.items()}
    return mask_secrets({k: v for k, v in raw.items() if v is not None})


def too_many(limit: int) -> StepError:
    return StepError(ErrorCategory.VALIDATION, f"the window holds more than max_records={limit} records; narrow the "
                     "window or raise max_records", code="too_many_records")  # fmt: skip
