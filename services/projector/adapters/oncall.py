"""On-call pages in PostgreSQL: chosen in the projector's batch from the runs it finished INTERNAL, sent by the
alert dispatcher through the shared outbox (retries for 24 hours, the network guard) — docs/alerts.md."""

from __future__ import annotations

import functools
from datetime import timedelta

import asyncpg

from schemas import codec
from services.common.outbox import Queue
from services.projector import oncall
from services.projector.settings import ProjectorSettings

# Deployment-level: no owner row, nothing to sign with.
QUEUE = Queue(table="oncall_pages", owner="(SELECT NULL::text AS secret)", owner_match="true",
              columns="'oncall' AS channel_type, d.target, d.body, o.secret")  # fmt: skip


@functools.cache
def _policy() -> tuple[str, timedelta]:
    """The on-call URL and window, read once per process like every projector setting."""
    s = ProjectorSettings()
    return s.oncall_webhook_url, timedelta(seconds=s.oncall_window_s)


async def enqueue(conn: asyncpg.Connection, run_ids: list[str]) -> int:
    """Page for the runs among `run_ids` that failed INTERNAL, once per fingerprint per window (counted in event
    time from the fingerprint's last page). Takes a lock per fingerprint, so two projectors page once."""
    url, window = _policy()
    if not url or not run_ids:
        return 0
    rows = await conn.fetch(
        "SELECT id, tenant_id, environment, flow_id, status, error_fingerprint, error_message, finished_at FROM runs "
        "WHERE id = ANY($1::text[]) AND finished_at IS NOT NULL "
        "AND (error_category = 'INTERNAL' OR status = 'INTERNAL_ERROR')",
        run_ids,
    )
    if not rows:
        return 0
    failures = [
        oncall.Failure(r["id"], r["tenant_id"], r["environment"], r["flow_id"],
                       r["error_fingerprint"] or f"{r['status']}:{r['flow_id']}",
                       r["error_message"] or r["status"], r["finished_at"])
        for r in rows
    ]  # fmt: skip
    fingerprints = sorted({f.fingerprint for f in failures})
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('oncall:' || f)) FROM unnest($1::text[]) AS f ORDER BY f", fingerprints
    )
    last = {
        r["fingerprint"]: r["at"]
        for r in await conn.fetch(
            "SELECT fingerprint, max(at) AS at FROM oncall_pages WHERE fingerprint = ANY($1::text[]) GROUP BY 1",
            fingerprints,
        )
    }
    pages = oncall.due(failures, last, window)
    if not pages:
        return 0
    result = await conn.fetch(
        """
        INSERT INTO oncall_pages (id, fingerprint, at, run_id, tenant_id, flow_id, target, body, next_attempt_at)
        SELECT i, f, a, r, t, fl, $7, b::jsonb, now()
        FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $8::text[])
             AS u(i, f, a, r, t, fl, b)
        ON CONFLICT (id) DO NOTHING RETURNING id
        """,
        [oncall.page_id(p) for p in pages], [p.fingerprint for p in pages], [p.at for p in pages],
        [p.run_id for p in pages], [p.tenant_id for p in pages], [p.flow_id for p in pages], url,
        [codec.dumps(oncall.body(p, window)).decode() for p in pages],
    )  # fmt: skip
    return len(result)
