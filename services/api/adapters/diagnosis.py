"""The SQL behind GET /v1/runs/{id}/diagnosis: the signals `services/api/diagnosis.py` decides from, read from the
projector's read models and scoped to the caller's tenant and environment (invariant 7)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from services.api import diagnosis as pure
from services.api.models import diagnosis as m

# How far around a run its dependency's other calls are counted (docs/runs.md, Diagnosis), and how many of the
# tenant's runs in that time are looked at, newest first.
BEFORE = timedelta(hours=1)
AFTER = timedelta(minutes=15)
NEARBY_RUNS = 5000

_RUN = """
SELECT r.id, r.flow_id, r.flow_version, r.status, r.error, r.error_message, r.error_fingerprint, r.created_at,
       r.started_at, r.finished_at, x.step, s.action, s.input, s.assertions
FROM runs r
-- The failed step, or for a PARTIAL run the step whose records were rejected.
CROSS JOIN LATERAL (SELECT coalesce(r.failed_step, (SELECT e.step FROM record_errors e WHERE e.run_id = r.id
                                                    ORDER BY e.seq LIMIT 1)) AS step) x
LEFT JOIN run_steps s ON s.run_id = r.id AND s.step = x.step
WHERE r.id = $1 AND r.tenant_id = $2 AND r.environment = $3
"""

_ATTEMPTS = """
(SELECT coalesce(jsonb_agg(jsonb_build_object(
    'attempt', a.attempt, 'status', a.status, 'error', a.error,
    'duration_ms', CASE WHEN a.started_at IS NOT NULL THEN a.duration_ms END) ORDER BY a.attempt), '[]'::jsonb)
 FROM step_attempts a WHERE a.run_id = r.id AND a.step = $6)
"""

# The last N runs of the flow up to this one (runs_tenant_flow_created_idx), each with the step's attempts.
_PAST = f"""
SELECT r.id, r.flow_version, r.status, r.created_at, r.error_fingerprint, {_ATTEMPTS} AS attempts
FROM runs r
WHERE r.tenant_id = $1 AND r.flow_id = $2 AND r.environment = $3 AND (r.created_at, r.id) <= ($4, $5)
  AND r.last_seq >= 0
ORDER BY r.created_at DESC, r.id DESC
LIMIT $7
"""

_REJECTED = """
SELECT count(*) OVER () AS count, record_key, field_path, error FROM record_errors WHERE run_id = $1
ORDER BY seq LIMIT 1
"""

_GROUP = "SELECT first_seen FROM failure_groups WHERE tenant_id = $1 AND environment = $2 AND fingerprint = $3"

_VERSIONS = """
SELECT version, jsonb_path_query_first(definition, '$.steps[*] ? (@.name == $s)', jsonb_build_object('s', $3::text))
           AS step,
       (definition ->> 'timeout_s')::float8 AS timeout_s, definition -> 'retry' AS retry
FROM flow_versions WHERE tenant_id = $1 AND flow_id = $2 AND version <= $4
"""

# Other runs' attempts that called the same connector or host, finished inside the window.
_CALLS = """
WITH nearby AS (
    SELECT id FROM runs
    WHERE tenant_id = $1 AND environment = $2 AND created_at >= $3::timestamptz - $8::interval
      AND created_at <= $4 AND id <> $5
    ORDER BY created_at DESC LIMIT $9
), calls AS (
    SELECT a.run_id, a.status, coalesce(a.error ->> 'category', 'UNKNOWN') AS category, a.finished_at
    FROM nearby n JOIN step_attempts a ON a.run_id = n.id
    WHERE a.started_at IS NOT NULL AND a.finished_at BETWEEN $3 AND $4 AND a.status IN ('SUCCEEDED', 'FAILED')
      AND ({match})
)
SELECT count(*) FILTER (WHERE status = 'FAILED') AS failures,
       count(*) FILTER (WHERE status = 'SUCCEEDED') AS successes,
       count(DISTINCT run_id) FILTER (WHERE status = 'FAILED') AS failed_runs,
       count(DISTINCT run_id) FILTER (WHERE status = 'SUCCEEDED') AS succeeded_runs,
       max(finished_at) FILTER (WHERE status = 'SUCCEEDED') AS last_success_at,
       (SELECT coalesce(jsonb_object_agg(category, n), '{{}}'::jsonb)
        FROM (SELECT category, count(*) AS n FROM calls WHERE status = 'FAILED' GROUP BY category) c) AS categories
FROM calls
"""
_BY_CONNECTOR = _CALLS.format(
    match="$6 IN (a.input ->> 'connector', a.input -> 'source' ->> 'connector', "
    "a.input -> 'destination' ->> 'connector') AND $7::text IS NULL"
)
_BY_HOST = _CALLS.format(match="lower(substring(a.input ->> 'url' from $7)) = $6")

_HEALTH = "SELECT status, degraded_since, last_success_at FROM connector_health WHERE tenant_id = $1 AND connector = $2"


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str) else value


async def get_run(pool: asyncpg.Pool, tenant_id: str, environment: str, run_id: str) -> asyncpg.Record | None:
    """The run with its failed step (`step`) and that step's action, input and assertions, or None when the caller
    cannot see the run."""
    return await pool.fetchrow(_RUN, run_id, tenant_id, environment)


def _attempts(value: Any) -> tuple[pure.Attempt, ...]:
    return tuple(pure.Attempt(attempt=a["attempt"], status=a["status"], error=a.get("error"),
                              duration_ms=a.get("duration_ms")) for a in _json(value) or [])  # fmt: skip


async def signals(
    pool: asyncpg.Pool, tenant_id: str, environment: str, run: Mapping[str, Any], last_n: int
) -> pure.Signals:
    """Everything the diagnosis of `run` (a row of `get_run`) reads."""
    step = run["step"]
    async with pool.acquire() as conn:
        past = await conn.fetch(_PAST, tenant_id, run["flow_id"], environment, run["created_at"], run["id"], step,
                                last_n)  # fmt: skip
        rejected = await conn.fetchrow(_REJECTED, run["id"])
        versions = await conn.fetch(_VERSIONS, tenant_id, run["flow_id"], step or "", run["flow_version"])
        group_first_seen = None
        if run["error_fingerprint"]:
            group_first_seen = await conn.fetchval(_GROUP, tenant_id, environment, run["error_fingerprint"])
        this = next((p for p in past if p["id"] == run["id"]), None)
        dependency = await _dependency(conn, tenant_id, environment, run, step)
    return pure.Signals(
        run_id=run["id"], flow_id=run["flow_id"], flow_version=run["flow_version"], status=run["status"],
        error=_json(run["error"]), error_message=run["error_message"], failed_step=step,
        fingerprint=run["error_fingerprint"], step_action=run["action"],
        attempts=_attempts(this["attempts"]) if this else (),
        assertions=tuple(_json(run["assertions"]) or ()),
        rejected=m.RejectedRecords(count=rejected["count"], first_key=rejected["record_key"],
                                   first_field_path=rejected["field_path"], first_error=rejected["error"])
        if rejected else None,
        last_n=last_n,
        past=tuple(pure.PastRun(id=p["id"], flow_version=p["flow_version"], status=p["status"],
                                created_at=p["created_at"], fingerprint=p["error_fingerprint"],
                                attempts=_attempts(p["attempts"])) for p in past),
        group_first_seen=group_first_seen,
        versions={v["version"]: pure.Version(step=_json(v["step"]), flow_timeout_s=v["timeout_s"],
                                             flow_retry=_json(v["retry"])) for v in versions},
        dependency=dependency,
    )  # fmt: skip


def window(run: Mapping[str, Any]) -> tuple[datetime, datetime]:
    start = run["started_at"] or run["created_at"]
    end = run["finished_at"] or start
    return start - BEFORE, end + AFTER


async def _dependency(
    conn: asyncpg.Connection, tenant_id: str, environment: str, run: Mapping[str, Any], step: str | None
) -> m.DependencyHealth | None:
    """The connector the failed step named, else the host an http_request step called: its other calls nearby."""
    if step is None:
        return None
    step_input = _json(run["input"])
    connector = pure.step_connector(step_input)
    host = pure.url_host(step_input.get("url")) if isinstance(step_input, dict) else None
    if connector is not None:
        query, name, extra = _BY_CONNECTOR, connector, None
    elif host is not None:
        query, name, extra = _BY_HOST, host, pure.HOST_SQL_PATTERN
    else:
        return None
    since, until = window(run)
    row = await conn.fetchrow(query, tenant_id, environment, since, until, run["id"], name, extra, BEFORE,
                              NEARBY_RUNS)  # fmt: skip
    status = degraded_since = None
    last_success_at = row["last_success_at"]
    if connector is not None:
        health = await conn.fetchrow(_HEALTH, tenant_id, connector)
        if health is not None:
            # Degraded at the run's time only if it was degraded before the run ended.
            end = run["finished_at"] or until
            at_the_time = health["status"] == "degraded" and health["degraded_since"] <= end
            status = "degraded" if at_the_time else "ok"
            degraded_since = health["degraded_since"] if at_the_time else None
            if last_success_at is None and health["last_success_at"] and health["last_success_at"] <= until:
                last_success_at = health["last_success_at"]
    return m.DependencyHealth(
        kind="connector" if connector else "host", name=name, window_from=since, window_to=until,
        failures=row["failures"], successes=row["successes"], failed_runs=row["failed_runs"],
        succeeded_runs=row["succeeded_runs"], failure_categories=_json(row["categories"]) or {},
        last_success_at=last_success_at, status=status, degraded_since=degraded_since,
    )  # fmt: skip
