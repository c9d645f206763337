"""Who and what started a keyed trigger, from its headers (docs/intake.md#manual-triggers-and-nested-runs): the
console's and the CLI's `X-Flowtrail-Trigger: manual` (recorded as trigger type `manual`, the caller still the key's
id, so nobody can name another user), and the nested-run headers `ap-parent-run-id` / `ap-fail-parent-on-failure`
(the parent must be a run of the key's tenant and environment).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import asyncpg

from schemas.events import TriggerType
from services.common.auth import Principal
from services.common.http import ApiError

MARKER_HEADER = "x-flowtrail-trigger"
PARENT_HEADER = "ap-parent-run-id"
FAIL_PARENT_HEADER = "ap-fail-parent-on-failure"
# The headers a browser page may send across origins to a trigger route (CORS), beside the usual ones.
HEADERS = ("X-Flowtrail-Trigger", "ap-parent-run-id", "ap-fail-parent-on-failure")
_MARKERS = {"manual": TriggerType.MANUAL, "api": TriggerType.API}
_BOOLEANS = {"true": True, "false": False}
_MAX_RUN_ID = 100


@dataclass(frozen=True)
class Origin:
    """`type` replaces `api` for a request marked manual, `caller_name` is then the key's name; `parent_run_id`
    links the runs to a parent."""

    type: TriggerType = TriggerType.API
    parent_run_id: str | None = None
    fail_parent_on_failure: bool = False
    caller_name: str | None = None


def parse_origin(headers: Mapping[str, str]) -> Origin:
    """The headers checked (422 naming the header otherwise); the parent is looked up by `trigger_origin`."""
    marker = headers.get(MARKER_HEADER)
    if marker is not None and marker.strip().lower() not in _MARKERS:
        raise ApiError(422, "validation_error", f"X-Flowtrail-Trigger: {marker[:40]!r} is not `manual` or `api`")
    parent = headers.get(PARENT_HEADER)
    if parent is not None and not (0 < len(parent) <= _MAX_RUN_ID and parent.isascii() and parent.isprintable()):
        raise ApiError(422, "validation_error", f"{PARENT_HEADER}: a run id of 1 to {_MAX_RUN_ID} ASCII characters")
    fail = headers.get(FAIL_PARENT_HEADER)
    if fail is not None and fail.strip().lower() not in _BOOLEANS:
        raise ApiError(422, "validation_error", f"{FAIL_PARENT_HEADER}: `true` or `false`, not {fail[:40]!r}")
    fail_parent = fail is not None and _BOOLEANS[fail.strip().lower()]
    if fail_parent and parent is None:
        raise ApiError(422, "validation_error", f"{FAIL_PARENT_HEADER} needs {PARENT_HEADER}: which run to fail")
    kind = _MARKERS[marker.strip().lower()] if marker is not None else TriggerType.API
    return Origin(kind, parent, fail_parent)


async def trigger_origin(pool: asyncpg.Pool, principal: Principal, headers: Iterable[tuple[bytes, bytes]]) -> Origin:
    """`parse_origin` of a request's raw headers (ASGI: names in lower case), and the parent run found in the key's
    tenant and environment (404 otherwise, as for any run the key cannot see)."""
    wanted = {MARKER_HEADER, PARENT_HEADER, FAIL_PARENT_HEADER}
    named = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers if n.decode("latin-1") in wanted}
    origin = parse_origin(named)
    if origin.parent_run_id is not None and not await pool.fetchval(
        "SELECT 1 FROM runs WHERE tenant_id = $1 AND id = $2 AND environment = $3",
        principal.tenant_id, origin.parent_run_id, principal.environment,
    ):  # fmt: skip
        raise ApiError(404, "not_found", f"{PARENT_HEADER}: no run with id {origin.parent_run_id!r}")
    if origin.type == TriggerType.MANUAL:
        name = await pool.fetchval("SELECT name FROM api_keys WHERE id = $1", principal.key_id)
        return replace(origin, caller_name=name or None)
    return origin
