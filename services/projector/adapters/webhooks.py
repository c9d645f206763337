"""Webhook deliveries: enqueued inside the projector's batch transaction, sent by a dispatcher loop."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from schemas import codec
from schemas.events import ConnectorDegraded, EventBase, FlowEventBase, FlowPaused
from schemas.flows import mask_secrets
from services.common.netguard import check_url, guarded_client
from services.common.outbox import Attempt, Outbox, Queue
from services.common.webhooks import RUN_EVENTS, sign
from services.projector import metrics

log = logging.getLogger(__name__)
_NS = uuid.UUID("0b6f0e55-7a7c-4a39-9f55-1c61b1d2f7a1")
_SUMMARY = ("id", "flow_id", "flow_version", "flow_name", "status", "environment", "trigger_type", "caller",
            "failed_step", "error_message", "created_at", "started_at", "finished_at", "duration_ms")  # fmt: skip
_AT_START = ("id", "flow_id", "flow_version", "flow_name", "environment", "trigger_type", "caller", "created_at")


async def enqueue(conn: asyncpg.Connection, events: list[EventBase], flow_events: list[FlowEventBase]) -> int:
    """One pending delivery per (subscription, event); a redelivered event hits the unique key and adds none."""
    wanted = [e for e in events if e.type in RUN_EVENTS]
    paused = [e for e in flow_events if isinstance(e, FlowPaused)]
    if not wanted and not paused:
        return 0
    subs = await conn.fetch("SELECT id, tenant_id, environment, events FROM webhook_subscriptions WHERE active")
    if not subs:
        return 0
    runs = {
        r["id"]: r
        for r in await conn.fetch(
            f"SELECT {', '.join(_SUMMARY)} FROM runs WHERE id = ANY($1::text[])", list({e.run_id for e in wanted})
        )
    } if wanted else {}  # fmt: skip
    rows: list[tuple[Any, ...]] = []
    for e in wanted:
        run = runs.get(e.run_id)
        if run is None:
            continue
        name = RUN_EVENTS[e.type]
        if name == "run.started":
            # The row may already show a later state (same batch): send only what was true at the start.
            data = {"run": {**{k: run[k] for k in _AT_START}, "status": "RUNNING", "started_at": e.occurred_at}}
        else:
            data = {"run": {k: run[k] for k in _SUMMARY}}
        rows += _offer(subs, e.tenant_id, run["environment"], name, f"{e.run_id}:{e.seq}", e.occurred_at, data)
    for f in paused:
        data = {"flow": {"id": f.flow_id, "version": f.flow_version, "reason": f.reason}}
        for environment in ("PRODUCTION", "TESTING"):
            rows += _offer(subs, f.tenant_id, environment, "flow.paused", f"flow:{f.event_id}", f.occurred_at, data)
    return await _insert(conn, rows)


async def enqueue_connector_degraded(conn: asyncpg.Connection, began: list[ConnectorDegraded]) -> int:
    """`connector.degraded` for the events that turned a connector degraded (services.projector.connectors
    picks them: once per transition, not per failing step), to subscriptions of the run's environment."""
    subs = await conn.fetch("SELECT id, tenant_id, environment, events FROM webhook_subscriptions WHERE active")
    if not subs or not began:
        return 0
    runs = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, environment, flow_name FROM runs WHERE id = ANY($1::text[])", list({e.run_id for e in began})
        )
    }
    rows: list[tuple[Any, ...]] = []
    for e in began:
        run = runs.get(e.run_id)
        if run is None:
            continue
        p = e.payload
        data = {
            "connector": {"name": p.connector, "status": "degraded", "degraded_since": e.occurred_at},
            "flow": {"id": e.flow_id, "version": e.flow_version, "name": run["flow_name"]},
            "run_id": e.run_id, "step": p.step, "error": mask_secrets(p.error.model_dump(mode="json")),
            "occurred_at": e.occurred_at,
        }  # fmt: skip
        key = f"{e.run_id}:{e.seq}"
        rows += _offer(subs, e.tenant_id, run["environment"], "connector.degraded", key, e.occurred_at, data)
    return await _insert(conn, rows)


async def _insert(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> int:
    if not rows:
        return 0
    cols = list(zip(*rows, strict=True))
    await conn.execute(
        """
        INSERT INTO webhook_deliveries (id, subscription_id, tenant_id, event, event_key, body, next_attempt_at)
        SELECT i, s, t, e, k, b::jsonb, now()
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS u(i, s, t, e, k, b)
        ON CONFLICT (subscription_id, event_key) DO NOTHING
        """,
        *[list(c) for c in cols],
    )
    return len(rows)


def _offer(subs: list[asyncpg.Record], tenant_id: str, environment: str, name: str, key: str, at: datetime,
           data: dict[str, Any]) -> list[tuple[Any, ...]]:  # fmt: skip
    out = []
    for s in subs:
        if s["tenant_id"] != tenant_id or s["environment"] != environment or name not in s["events"]:
            continue
        delivery_id = "del_" + uuid.uuid5(_NS, f"{s['id']}:{key}").hex[:20]
        body = {"id": delivery_id, "event": name, "created_at": at, "data": data}
        out.append((delivery_id, s["id"], tenant_id, name, key, codec.dumps(body).decode()))
    return out


_QUEUE = Queue(
    table="webhook_deliveries",
    owner="webhook_subscriptions",
    owner_match="o.id = d.subscription_id AND o.active",
    columns="d.event, d.body, o.url, o.secret",
)


class Dispatcher:
    """Claims due deliveries with a lease (several projectors may run), posts them signed, records every
    attempt (webhook_attempts), and retries non-2xx answers with exponential backoff for up to 24 hours
    (services/common/outbox.py)."""

    def __init__(self, pool: asyncpg.Pool, *, allow_private: bool, backoff_s: float, lease_s: float = 60) -> None:
        self.pool = pool
        self.allow_private = allow_private
        # Resolved once, checked and pinned per connection: the guard is where the delivery connects.
        self.client = guarded_client(allow_private, timeout=10, follow_redirects=False)
        self.outbox = Outbox(_QUEUE, self._post, backoff_s=backoff_s, lease_s=lease_s, noun="webhook",
                             journal=_journal)  # fmt: skip

    async def close(self) -> None:
        await self.client.aclose()

    async def run_once(self, limit: int = 50) -> int:
        attempts = await self.outbox.run_once(self.pool, limit)
        for a in attempts:
            metrics.WEBHOOK_DELIVERIES.labels(a.status if a.status != "pending" else "retrying").inc()
        return len(attempts)

    async def _post(self, d: asyncpg.Record) -> int:
        await check_url(d["url"], allow_private=True)  # scheme and host; the address where it connects
        body = codec.dumps(d["body"])
        headers = {
            "Content-Type": "application/json",
            "X-Flowtrail-Event": d["event"],
            "X-Flowtrail-Delivery": d["id"],
            "X-Flowtrail-Signature": sign(d["secret"], body),
        }
        response = await self.client.post(d["url"], content=body, headers=headers)
        return response.status_code


async def _journal(conn: asyncpg.Connection, d: asyncpg.Record, attempt: Attempt) -> None:
    await conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, error, duration_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        d["id"], attempt.number, attempt.at, attempt.status_code, attempt.error, attempt.duration_ms,
    )  # fmt: skip
