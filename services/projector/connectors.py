"""Connector health from the ledger, folded in the projector's batch transaction (seeds 000, 003: auth or
quota errors degrade).

A connector is degraded by a ConnectorDegraded event (a step naming it hit an AUTH error or a 429) and is ok again
once a later step whose input named it succeeds (the StepStarted input the projector recorded). "Later" is
event time, never arrival order, so whichever order partitions interleave in, live or in a rebuild, the row
comes out the same: degraded exactly when the newest AUTH failure is newer than the newest success, and
`degraded_since` is the first AUTH failure after that success. Each ok → degraded transition offers one
`connector.degraded` webhook, keyed by the event that began it; a replayed event is a duplicate the
projector never folds again, so nothing is offered twice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

import asyncpg

from schemas.events import ConnectorDegraded, EventBase
from services.projector.adapters import webhooks

Key = tuple[str, str]  # tenant, connector name


def step_connectors(step_input: Any) -> list[str]:
    """The connectors a step input names, by the executor's rule (decide._connectors): `connector`, or the
    `connector` of its `source` / `destination`."""
    if not isinstance(step_input, dict):
        return []
    found = [step_input.get("connector")]
    found += [part.get("connector") for part in (step_input.get("source"), step_input.get("destination"))
              if isinstance(part, dict)]  # fmt: skip
    return [c for c in dict.fromkeys(found) if isinstance(c, str) and c and "{{" not in c]


@dataclass(frozen=True, slots=True)
class Health:
    """One connector_health row."""

    status: str = "ok"
    degraded_since: datetime | None = None
    last_error: dict[str, Any] | None = None
    last_failure_run_id: str | None = None
    last_failure_seq: int | None = None
    last_failure_step: str | None = None
    last_auth_failure_at: datetime | None = None
    last_success_at: datetime | None = None
    last_success_run_id: str | None = None
    updated_at: datetime | None = None


COLUMNS = tuple(f.name for f in fields(Health))


@dataclass(frozen=True, slots=True)
class Success:
    at: datetime
    run_id: str


def _later(at: datetime, current: datetime | None) -> datetime:
    return at if current is None or at > current else current


def fail(h: Health, e: ConnectorDegraded) -> tuple[Health, bool]:
    """Fold an AUTH failure; True when it turned an ok connector degraded."""
    at = e.occurred_at
    newest = h.last_auth_failure_at is None or (at, e.run_id, e.seq) > (
        h.last_auth_failure_at, h.last_failure_run_id or "", h.last_failure_seq or 0,
    )  # fmt: skip
    if newest:
        h = replace(h, last_auth_failure_at=at, last_error=e.payload.error.model_dump(mode="json"),
                    last_failure_run_id=e.run_id, last_failure_seq=e.seq, last_failure_step=e.payload.step)  # fmt: skip
    h = replace(h, updated_at=_later(at, h.updated_at))
    if h.last_success_at is not None and at <= h.last_success_at:
        return h, False  # an older failure than the success that already cleared it
    if h.degraded_since is not None:
        return replace(h, degraded_since=min(h.degraded_since, at)), False
    return replace(h, status="degraded", degraded_since=at), True


def succeed(h: Health, s: Success) -> tuple[Health, bool]:
    """Fold a success of a step using the connector; True when the first failure after it must be looked up
    (a failure newer than this success was folded before it, and the degraded period restarts there)."""
    h = replace(h, updated_at=_later(s.at, h.updated_at))
    if h.last_success_at is not None and (s.at, s.run_id) <= (h.last_success_at, h.last_success_run_id or ""):
        return h, False
    h = replace(h, last_success_at=s.at, last_success_run_id=s.run_id)
    if h.degraded_since is None or h.degraded_since > s.at:
        return h, False
    if h.last_auth_failure_at is not None and h.last_auth_failure_at > s.at:
        return h, True
    return replace(h, status="ok", degraded_since=None), False


# ---------------------------------------------------------------- the batch runner


async def project(conn: asyncpg.Connection, events: list[EventBase], *, deliver: bool) -> int:
    """Fold this batch's AUTH failures and connector-using successes into connector_health (in event-time
    order); enqueue a `connector.degraded` delivery for each transition when `deliver` (not in a rebuild).
    Returns the number of connectors whose row changed."""
    signals = await _signals(conn, events)
    if not signals:
        return 0
    keys = sorted({k for k, _ in signals})
    states = await _lock(conn, keys)
    before = dict(states)
    began: list[ConnectorDegraded] = []
    for key, signal in sorted(signals, key=_order):
        h = states[key]
        if isinstance(signal, ConnectorDegraded):
            h, started = fail(h, signal)
            if started:
                began.append(signal)
        else:
            h, restart = succeed(h, signal)
            if restart:
                since = await _first_failure_after(conn, key, signal.at)
                h = replace(h, degraded_since=since, status="ok" if since is None else "degraded")
        states[key] = h
    changed = {k: h for k, h in states.items() if h != before[k]}
    await _save(conn, changed)
    if deliver and began:
        await webhooks.enqueue_connector_degraded(conn, began)
    return len(changed)


Signal = ConnectorDegraded | Success


def _order(item: tuple[Key, Signal]) -> tuple[datetime, str, int]:
    _, s = item
    return (s.occurred_at, s.run_id, s.seq) if isinstance(s, ConnectorDegraded) else (s.at, s.run_id, -1)


async def _signals(conn: asyncpg.Connection, events: list[EventBase]) -> list[tuple[Key, Signal]]:
    out: list[tuple[Key, Signal]] = [
        ((e.tenant_id, e.payload.connector), e) for e in events if isinstance(e, ConnectorDegraded)
    ]
    # Reused outputs (FROM_FAILED_STEP) ran nothing against the connector: they prove nothing.
    succeeded = [e for e in events if e.type == "StepSucceeded" and e.payload.reused_from is None]
    if not succeeded:
        return out
    inputs: dict[tuple[str, str], Any] = {}
    for e in events:
        if e.type == "StepStarted":
            inputs[(e.run_id, e.payload.step)] = e.payload.input  # log order: the latest attempt wins
    missing = [(e.run_id, e.payload.step) for e in succeeded if (e.run_id, e.payload.step) not in inputs]
    if missing:
        # Started in an earlier batch: run_steps holds the latest attempt's input (written earlier in this one).
        rows = await conn.fetch(
            "SELECT s.run_id, s.step, s.input FROM run_steps s "
            "JOIN unnest($1::text[], $2::text[]) AS u(run_id, step) ON s.run_id = u.run_id AND s.step = u.step",
            [m[0] for m in missing], [m[1] for m in missing],
        )  # fmt: skip
        inputs.update({(r["run_id"], r["step"]): r["input"] for r in rows})
    for e in succeeded:
        for name in step_connectors(inputs.get((e.run_id, e.payload.step))):
            out.append(((e.tenant_id, name), Success(e.occurred_at, e.run_id)))
    return out


async def _lock(conn: asyncpg.Connection, keys: list[Key]) -> dict[Key, Health]:
    """Rows locked in key order: two projectors (on other partitions) never fold one connector at once."""
    tenants, names = [k[0] for k in keys], [k[1] for k in keys]
    await conn.execute(
        "INSERT INTO connector_health (tenant_id, connector, status) "
        "SELECT t, c, 'ok' FROM unnest($1::text[], $2::text[]) AS u(t, c) ORDER BY 1, 2 ON CONFLICT DO NOTHING",
        tenants, names,
    )  # fmt: skip
    rows = await conn.fetch(
        f"SELECT tenant_id, connector, {', '.join(COLUMNS)} FROM connector_health "
        "WHERE (tenant_id, connector) IN (SELECT * FROM unnest($1::text[], $2::text[])) "
        "ORDER BY tenant_id, connector FOR UPDATE",
        tenants, names,
    )  # fmt: skip
    return {(r["tenant_id"], r["connector"]): Health(**{c: r[c] for c in COLUMNS}) for r in rows}


async def _first_failure_after(conn: asyncpg.Connection, key: Key, at: datetime) -> datetime | None:
    value: datetime | None = await conn.fetchval(
        "SELECT min(occurred_at) FROM run_events WHERE type = 'ConnectorDegraded' AND tenant_id = $1 "
        "AND payload ->> 'connector' = $2 AND occurred_at > $3",
        key[0], key[1], at,
    )  # fmt: skip
    return value


async def _save(conn: asyncpg.Connection, changed: dict[Key, Health]) -> None:
    if not changed:
        return
    sets = ", ".join(f"{c} = ${i + 3}" for i, c in enumerate(COLUMNS))
    await conn.executemany(
        f"UPDATE connector_health SET {sets} WHERE tenant_id = $1 AND connector = $2",
        [(k[0], k[1], *(getattr(h, c) for c in COLUMNS)) for k, h in sorted(changed.items())],
    )
