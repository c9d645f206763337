"""The SQL behind /v1/analytics: rollup tables for counts, the runs table for duration percentiles."""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def flow_series(
    pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str, since: datetime, until: datetime, bucket: str
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        SELECT date_trunc($6, hour) AS bucket, status, trigger_type, sum(runs)::bigint AS runs,
               sum(duration_ms_sum)::float8 AS duration_ms_sum, sum(records_written)::bigint AS records_written,
               sum(records_failed)::bigint AS records_failed
        FROM flow_hourly
        WHERE tenant_id = $1 AND environment = $2 AND flow_id = $3 AND hour >= date_trunc('hour', $4::timestamptz)
          AND hour < $5
        GROUP BY 1, 2, 3 ORDER BY 1
        """,
        tenant_id, environment, flow_id, since, until, bucket,
    )  # fmt: skip


async def flow_percentiles(
    pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str, since: datetime, until: datetime, bucket: str
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        SELECT date_trunc($6, created_at) AS bucket,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ms) AS p99
        FROM runs
        WHERE tenant_id = $1 AND flow_id = $3 AND created_at >= $4 AND created_at < $5 AND environment = $2
          AND finished_at IS NOT NULL AND duration_ms IS NOT NULL
        GROUP BY 1 ORDER BY 1
        """,
        tenant_id, environment, flow_id, since, until, bucket,
    )  # fmt: skip


async def flakiness(
    pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str | None, min_runs: int
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        SELECT flow_id, flow_version, step, succeeded, failed, retried, last_failed_at,
               round(2.0 * LEAST(succeeded, failed) / (succeeded + failed), 4)::float8 AS score
        FROM step_outcomes
        WHERE tenant_id = $1 AND environment = $2 AND ($3::text IS NULL OR flow_id = $3)
          AND succeeded > 0 AND failed > 0 AND succeeded + failed >= $4
        ORDER BY score DESC, failed DESC, flow_id, flow_version, step
        LIMIT 200
        """,
        tenant_id, environment, flow_id, min_runs,
    )  # fmt: skip


async def failure_groups(
    pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str | None, category: str | None, limit: int
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        SELECT fingerprint, flow_id, step, category, message_pattern, sample_message, runs, first_seen, last_seen,
               last_run_id
        FROM failure_groups
        WHERE tenant_id = $1 AND environment = $2 AND ($3::text IS NULL OR flow_id = $3)
          AND ($4::text IS NULL OR category = $4)
        ORDER BY last_seen DESC, fingerprint
        LIMIT $5
        """,
        tenant_id, environment, flow_id, category, limit,
    )  # fmt: skip


async def endpoints(pool: asyncpg.Pool, tenant_id: str, environment: str, flow_id: str | None) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        SELECT flow_id, method, host, route, calls, last_seen FROM endpoint_coverage
        WHERE tenant_id = $1 AND environment = $2 AND ($3::text IS NULL OR flow_id = $3)
        ORDER BY host, route, method, flow_id
        LIMIT 1000
        """,
        tenant_id, environment, flow_id,
    )  # fmt: skip
