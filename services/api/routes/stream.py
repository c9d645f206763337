"""Live progress (docs/api-contract.md) as Server-Sent Events: one run's events as they are projected, and a tenant-wide
feed of run status changes. Both resume from the last event id a client saw (`Last-Event-ID`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from schemas.events import TERMINAL_EVENT_STATUS
from schemas.status import TERMINAL_RUN_STATUSES
from services.api.adapters import runs as store
from services.api.choices import many
from services.api.routes import Reader
from services.api.routes.runs import _run_or_404, _statuses, summary
from services.common.contract import INT32_MAX, parse_count, parse_timestamp
from services.common.http import ApiError

router = APIRouter()
TERMINAL_STATUSES = frozenset(s.value for s in TERMINAL_RUN_STATUSES)
# How long a stream sleeps without a projector notification before reading anyway, and the keep-alive.
IDLE_S = 5.0
PING_S = 15
# Runs of different partitions commit out of occurred_at order: re-read this far back and skip what was sent.
REORDER_WINDOW = timedelta(seconds=10)
_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "event": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}  # fmt: skip
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-Sent Events: `id`, `event` and `data` (JSON) per event",
          "content": {"text/event-stream": {"itemSchema": _EVENT}}}
}  # fmt: skip


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_UTC_Z).decode()


@router.get("/v1/runs/{run_id}/stream", response_class=EventSourceResponse, responses=_SSE)
async def stream_run(
    run_id: str,
    request: Request,
    principal: Reader,
    after_seq: Annotated[int | None, Query(ge=-1, le=INT32_MAX)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Every event of the run in `seq` order (`id` = seq), then the stream ends after the final status."""
    run = await _run_or_404(request, principal, run_id)
    # A run that had ended when the stream opened has all its events projected: after the last, the stream ends
    # (a client resuming past the end would otherwise wait for events that never come).
    ended = run["status"] in TERMINAL_STATUSES
    start = after_seq if after_seq is not None else -1
    if last_event_id:
        try:
            start = parse_count(last_event_id)
        except ValueError:
            raise ApiError(400, "invalid_request", "Last-Event-ID: expected the seq of the last event seen") from None
    pool, notifier = request.app.state.pool, request.app.state.notifier

    async def events() -> AsyncIterator[ServerSentEvent]:
        last = start
        while True:
            rows = await store.get_events(pool, run_id, last, 500)
            for r in rows:
                last = r["seq"]
                data = {"seq": r["seq"], "type": r["type"], "occurred_at": r["occurred_at"], "payload": r["payload"]}
                yield ServerSentEvent(_json(data), event=r["type"], id=str(r["seq"]))
                if r["type"] in TERMINAL_EVENT_STATUS:
                    return
            if len(rows) < 500:
                if ended:
                    return
                await notifier.wait(IDLE_S)

    return EventSourceResponse(events(), ping=PING_S)


def _cursor(text: str) -> tuple[datetime, str]:
    at, _, run_id = text.partition("|")
    try:
        since = parse_timestamp(at)
        since - REORDER_WINDOW
        return since, run_id
    except (ValueError, OverflowError):
        raise ApiError(400, "invalid_request", "Last-Event-ID: expected '<updated_at>|<run id>'") from None


@router.get("/v1/stream", response_class=EventSourceResponse, responses=_SSE)
async def stream_runs(
    request: Request,
    principal: Reader,
    flow_id: Annotated[list[str] | None, Query()] = None,
    status: Annotated[list[str] | None, Query()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Run status changes of the key's tenant and environment as they are projected (`event: run`, the run
    summary as data), optionally only some flows or statuses. Starts now, or after `Last-Event-ID`.

    Ordered by the events' own time with a 10 s window for runs of different partitions committing out
    of that order; step-by-step progress of one run is `/v1/runs/{id}/stream`."""
    flows, statuses = many(flow_id), _statuses(many(status))
    pool, notifier = request.app.state.pool, request.app.state.notifier
    if last_event_id:
        since, _ = _cursor(last_event_id)
    else:
        since = await pool.fetchval("SELECT now()")
    sql = (
        f"SELECT {', '.join(store.SUMMARY_COLUMNS)} FROM runs WHERE tenant_id = $1 AND environment = $2 "
        "AND updated_at > $3 AND (cardinality($4::text[]) = 0 OR flow_id = ANY($4::text[])) "
        "AND (cardinality($5::text[]) = 0 OR status = ANY($5::text[])) ORDER BY updated_at, id LIMIT 500"
    )

    async def events() -> AsyncIterator[ServerSentEvent]:
        newest = since
        sent: dict[str, tuple[datetime, str]] = {}  # run id → (updated_at, status) last sent
        while True:
            rows = await pool.fetch(sql, principal.tenant_id, principal.environment, newest - REORDER_WINDOW,
                                    flows, statuses)  # fmt: skip
            for r in rows:
                newest = max(newest, r["updated_at"])
                last = sent.get(r["id"])
                if r["updated_at"] <= since or (
                    last is not None and (last[1] == r["status"] or last[0] >= r["updated_at"])
                ):
                    continue  # seen already, or a step moved on without a status change
                sent[r["id"]] = (r["updated_at"], r["status"])
                event_id = f"{r['updated_at'].isoformat()}|{r['id']}"
                yield ServerSentEvent(summary(r).model_dump_json(), event="run", id=event_id)
            # Forget runs too old to come round again.
            horizon = newest - REORDER_WINDOW
            sent = {k: v for k, v in sent.items() if v[0] >= horizon}
            await notifier.wait(IDLE_S)

    return EventSourceResponse(events(), ping=PING_S)
