"""The cursor window of a syncing flow's run: from where the flow's last successful run ended (docs/runs.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from schemas.events import CursorWindow

# Where flow $2 of tenant $1 last ended a window; and whether a flow version `v` syncs records. Also used as parts of
# one statement by the trigger route's flow lookup (services/common/triggering.py).
SINCE = """(SELECT (r.cursor_window->>'updated_until')::timestamptz FROM runs r
         WHERE r.tenant_id = $1 AND r.flow_id = $2 AND r.status IN ('SUCCEEDED', 'PARTIAL')
           AND r.cursor_window IS NOT NULL AND r.retry_of IS NULL  -- a retry replays an older window
         ORDER BY r.created_at DESC LIMIT 1)"""
SYNCS = """v.definition->'steps' @> '[{"action": "sync_records"}]'"""
_WINDOW = f"""
SELECT {SINCE} AS since
FROM flow_versions v
WHERE v.tenant_id = $1 AND v.flow_id = $2 AND v.version = $3 AND {SYNCS}
"""


async def cursor_window(
    pool: Any, tenant_id: str, flow_id: str, version: int, until: datetime | None = None
) -> CursorWindow | None:
    """For a flow version with a sync_records step: `updated_since` = where the flow's last SUCCEEDED or PARTIAL
    run's window ended (None the first time: everything), `updated_until` = `until` (a schedule's tick) or now.
    None for other flows. A retry does not come here: it carries its original's window.

    Runs that overlap (the next starts before the last ended) read overlapping windows; writes are idempotent
    (upserts, `Idempotency-Key`), so a record read twice is written once.
    """
    row = await pool.fetchrow(_WINDOW, tenant_id, flow_id, version)
    if row is None:
        return None
    return CursorWindow(updated_since=row["since"], updated_until=until or datetime.now(UTC))
