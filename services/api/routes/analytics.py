"""GET /v1/analytics/...: pass rate, duration percentiles, flakiness, failure groups, endpoint coverage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from schemas.events import ErrorCategory
from services.api.adapters import analytics as store
from services.api.models import analytics as models
from services.api.routes import Reader
from services.common.contract import Timestamp
from services.common.http import ApiError

router = APIRouter()

# Flowtrail's deterministic failure analysis: what to do next, by error category (docs/architecture.md, Vocabulary).
NEXT_ACTION = {
    "TRANSIENT": "The remote side was unavailable or slow; retries are automatic. If the group keeps growing, "
    "check the endpoint's health and rate limits.",
    "AUTH": "Credentials were rejected: re-authorise or rotate the connector's credentials, then retry the runs "
    "from the failed step.",
    "VALIDATION": "The data or the mapping is wrong: fix the field named in the error (or the step's input), then "
    "retry the runs from the failed step.",
    "CONFLICT": "The destination holds a conflicting record: deduplicate or switch the write to an upsert, then retry.",
    "INTERNAL": "A Flowtrail defect: report it with a run id from this group; retry once it is fixed.",
}


# Errors Flowtrail words itself, whose next action is more precise than their category's (by message pattern).
NEXT_ACTION_BY_PATTERN = (
    ("the flow timeout of", "The run passed its flow's timeout while the failed step was running: make that step "
     "faster (or give it its own timeout_s) or raise the flow's timeout_s, then retry the runs from the failed step."),
    ("no answer to request", "Nobody answered the human_input request before it expired: answer sooner or raise the "
     "step's timeout_s, then retry the runs."),
)  # fmt: skip


def next_action(category: str, pattern: str) -> str:
    for prefix, action in NEXT_ACTION_BY_PATTERN:
        if pattern.startswith(prefix):
            return action
    return NEXT_ACTION[category]


def _window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """Default: the last seven days."""
    end = until if until is not None else datetime.now(UTC)
    try:
        start = since if since is not None else end - timedelta(days=7)
    except OverflowError:
        raise ApiError(422, "validation_error", "to: too early to count seven days back from; give `from`") from None
    if start >= end:
        raise ApiError(422, "validation_error", "from: must be before `to`")
    return start, end


@router.get("/v1/analytics/flows/{flow_id}", response_model_exclude_unset=True)
async def flow_analytics(
    flow_id: str,
    request: Request,
    principal: Reader,
    from_: Annotated[Timestamp | None, Query(alias="from")] = None,
    to: Timestamp | None = None,
    bucket: Literal["hour", "day"] = "day",
) -> models.FlowAnalytics:
    """Per bucket: runs by status and trigger, pass rate, duration p50/p95/p99 and records processed."""
    since, until = _window(from_, to)
    pool = request.app.state.pool
    known = await pool.fetchval(
        "SELECT true FROM flows WHERE tenant_id = $1 AND id = $2 AND environment = $3",
        principal.tenant_id, flow_id, principal.environment,
    )  # fmt: skip
    if not known:
        raise ApiError(404, "not_found", f"no flow with id {flow_id!r}")
    args = (principal.tenant_id, principal.environment, flow_id, since, until, bucket)
    buckets: dict[datetime, dict[str, Any]] = {}

    def bucket_of(at: datetime) -> dict[str, Any]:
        return buckets.setdefault(at, {
            "bucket": at, "runs": 0, "by_status": {}, "by_trigger": {}, "pass_rate": None,
            "duration_ms": {"p50": None, "p95": None, "p99": None, "mean": None},
            "records_written": 0, "records_failed": 0, "_duration_sum": 0.0,
        })  # fmt: skip

    for r in await store.flow_series(pool, *args):
        b = bucket_of(r["bucket"])
        b["runs"] += r["runs"]
        b["by_status"][r["status"]] = b["by_status"].get(r["status"], 0) + r["runs"]
        b["by_trigger"][r["trigger_type"]] = b["by_trigger"].get(r["trigger_type"], 0) + r["runs"]
        b["records_written"] += r["records_written"]
        b["records_failed"] += r["records_failed"]
        b["_duration_sum"] += r["duration_ms_sum"]
    for r in await store.flow_percentiles(pool, *args):
        bucket_of(r["bucket"])["duration_ms"].update(p50=r["p50"], p95=r["p95"], p99=r["p99"])
    totals = {"runs": 0, "succeeded": 0}
    for b in buckets.values():
        passed = b["by_status"].get("SUCCEEDED", 0)
        b["pass_rate"] = round(passed / b["runs"], 4) if b["runs"] else None
        b["duration_ms"]["mean"] = round(b.pop("_duration_sum") / b["runs"], 3) if b["runs"] else None
        totals["runs"] += b["runs"]
        totals["succeeded"] += passed
    return models.FlowAnalytics.model_validate(
        {
            "flow_id": flow_id,
            "from": since,
            "to": until,
            "bucket": bucket,
            "runs": totals["runs"],
            "pass_rate": round(totals["succeeded"] / totals["runs"], 4) if totals["runs"] else None,
            "series": [models.AnalyticsBucket(**buckets[k]) for k in sorted(buckets)],
        }
    )


@router.get("/v1/analytics/flakiness", response_model_exclude_unset=True)
async def flaky_steps(
    request: Request,
    principal: Reader,
    flow_id: str | None = None,
    min_runs: Annotated[int, Query(ge=2, le=100_000)] = 2,
) -> models.FlakySteps:
    """Steps that both passed and failed on the same flow version; score 1.0 = fails half the time."""
    rows = await store.flakiness(request.app.state.pool, principal.tenant_id, principal.environment, flow_id, min_runs)
    return models.FlakySteps(data=[models.FlakyStep(**r) for r in rows])


@router.get("/v1/analytics/failure-groups", response_model_exclude_unset=True)
async def failure_groups(
    request: Request,
    principal: Reader,
    flow_id: str | None = None,
    category: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> models.FailureGroups:
    """Final errors grouped by fingerprint (normalised message, step, category), newest first, each with the
    suggested next action. List a group's runs with `GET /v1/runs?error_fingerprint=<fingerprint>`."""
    if category is not None and category.upper() not in ErrorCategory.__members__:
        accepted = ", ".join(ErrorCategory.__members__)
        raise ApiError(422, "validation_error", f"category: unknown {category!r}; accepted: {accepted}")
    rows = await store.failure_groups(
        request.app.state.pool, principal.tenant_id, principal.environment, flow_id,
        category.upper() if category else None, limit,
    )  # fmt: skip
    return models.FailureGroups(
        data=[
            models.FailureGroup(**r, next_action=next_action(r["category"], r["message_pattern"] or "")) for r in rows
        ]
    )


@router.get("/v1/analytics/endpoints", response_model_exclude_unset=True)
async def endpoint_coverage(request: Request, principal: Reader, flow_id: str | None = None) -> models.Endpoints:
    """Hosts and routes (ids folded into `{id}`) that http_request steps called, with call counts."""
    rows = await store.endpoints(request.app.state.pool, principal.tenant_id, principal.environment, flow_id)
    return models.Endpoints(data=[models.Endpoint(**r) for r in rows])
