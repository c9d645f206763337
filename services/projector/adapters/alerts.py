"""Alerts in PostgreSQL: rules evaluated inside the projector's batch transaction, the no_success clock,
and a dispatcher that sends each fired or resolved alert to the rule's channels."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import asyncpg

from schemas import codec
from schemas.events import TERMINAL_EVENT_STATUS, EventBase
from services.common import slo_burn
from services.common.channels import PAGERDUTY_URL
from services.common.netguard import check_url, guarded_client
from services.common.outbox import Attempt, Outbox, Queue
from services.common.webhooks import sign
from services.projector import alerts
from services.projector.adapters import oncall
from services.projector.alerts import Finished, Fire, Resolve, Rule, State
from services.projector.settings import ProjectorSettings

log = logging.getLogger(__name__)
_RULE_COLUMNS = "id, tenant_id, environment, flow_id, kind, name, revisions, channels"
_ALERT_COLUMNS = "id, rule_id, flow_id, kind, run_id, fired_at, reason, payload, resolved_at, resolved_by_run_id"


def rule_from(row: asyncpg.Record) -> Rule:
    revisions = tuple(alerts.Revision.from_json(r) for r in row["revisions"])
    return Rule(row["id"], row["tenant_id"], row["environment"], row["flow_id"], row["kind"], row["name"], revisions)


@dataclass
class _Outcome:
    """What one evaluation decided, in the order it decided it."""

    rules: dict[str, tuple[Rule, list[dict[str, Any]]]] = field(default_factory=dict)  # id → rule, channels
    fired: dict[str, dict[str, Any]] = field(default_factory=dict)  # alert id → row
    open_fired: dict[str, list[str]] = field(default_factory=dict)  # rule id → alerts fired here, still open
    resolve_stored: dict[str, Resolve] = field(default_factory=dict)  # rule id → first resolve of earlier alerts

    def apply(self, rule: Rule, actions: Iterable[Fire | Resolve]) -> None:
        for a in actions:
            if isinstance(a, Fire):
                aid = alerts.alert_id(rule.id, a.key)
                self.fired[aid] = {
                    "id": aid, "tenant_id": rule.tenant_id, "environment": rule.environment, "rule_id": rule.id,
                    "flow_id": rule.flow_id, "kind": rule.kind, "run_id": a.run_id, "fired_at": a.at,
                    "reason": a.reason, "payload": a.details, "resolved_at": None, "resolved_by_run_id": None,
                }  # fmt: skip
                self.open_fired.setdefault(rule.id, []).append(aid)
                continue
            for aid in self.open_fired.pop(rule.id, []):
                self.fired[aid].update(resolved_at=a.at, resolved_by_run_id=a.run_id)
            self.resolve_stored.setdefault(rule.id, a)


async def evaluate(conn: asyncpg.Connection, events: list[EventBase], *, deliver: bool) -> int:
    """Fold this batch's finished runs into every matching rule (in event-time order, so the order partitions
    interleave in does not matter within a batch). `deliver=False` (a rebuild) records history, sends nothing."""
    finished = [e for e in events if TERMINAL_EVENT_STATUS.get(e.type) in alerts.OUTCOMES]
    if not finished:
        return 0
    if deliver:  # on-call pages are sent, not derived: a replay pages nobody again
        await oncall.enqueue(conn, sorted({e.run_id for e in finished}))
    pairs = sorted({(e.tenant_id, e.flow_id) for e in finished})
    rows = await conn.fetch(
        f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE (tenant_id, flow_id) IN "
        "(SELECT * FROM unnest($1::text[], $2::text[])) "
        "OR (flow_id = $3 AND tenant_id = ANY(SELECT DISTINCT unnest($1::text[]))) ORDER BY id FOR KEY SHARE",
        [p[0] for p in pairs], [p[1] for p in pairs], alerts.TENANT_WIDE,
    )  # fmt: skip
    if not rows:
        return 0
    runs = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, environment, flow_name, error_message, failed_step FROM runs WHERE id = ANY($1::text[])",
            list({e.run_id for e in finished}),
        )
    }
    by_flow: dict[tuple[str, str, str], list[Finished]] = {}  # (tenant, environment, flow or TENANT_WIDE)
    for e in sorted(finished, key=lambda e: (e.occurred_at, e.run_id)):
        if (run := runs.get(e.run_id)) is None:
            continue  # purged by retention before it was projected
        done = Finished(e.run_id, TERMINAL_EVENT_STATUS[e.type], e.occurred_at, run["flow_name"],
                        run["error_message"], run["failed_step"], e.flow_id)  # fmt: skip
        by_flow.setdefault((e.tenant_id, run["environment"], e.flow_id), []).append(done)
        by_flow.setdefault((e.tenant_id, run["environment"], alerts.TENANT_WIDE), []).append(done)
    states = await _lock_states(conn, [r["id"] for r in rows])
    outcome = _Outcome()
    changed: dict[str, State] = {}
    for row in rows:
        rule = rule_from(row)
        outcome.rules[rule.id] = (rule, row["channels"])
        state = states[rule.id]
        for done in by_flow.get((rule.tenant_id, rule.environment, rule.flow_id), []):
            counts = await _slo_counts(conn, rule, done.at) if rule.kind == "slo_burn" else None
            state, actions = alerts.step(rule, state, done, counts)
            outcome.apply(rule, actions)
        if state != states[rule.id]:
            changed[rule.id] = state
    await _save_states(conn, changed)
    return await _record(conn, outcome, deliver=deliver)


async def _slo_counts(conn: asyncpg.Connection, rule: Rule, at: datetime) -> dict[float, slo_burn.Counts] | None:
    """slo_burn: the flow's (or with TENANT_WIDE the tenant's) finished and failed runs in each of the rule's windows
    ending at `at`, in one query: runs_tenant_flow_created_idx (runs_tenant_created_idx for a tenant) bounded by
    created_at, as a run that finished by `at` was created by it."""
    revision = rule.in_force(at)
    if revision is None:
        return None
    minutes = slo_burn.windows(revision.params)
    # Literal clauses, so each shape plans on its own index: (tenant, flow, created_at) or (tenant, created_at).
    flow = "$2::text = $2" if rule.flow_id == alerts.TENANT_WIDE else "flow_id = $2"
    rows = await conn.fetch(
        f"""
        WITH r AS MATERIALIZED (
            SELECT finished_at, status = ANY($6::text[]) AS failed FROM runs
            WHERE tenant_id = $1 AND {flow} AND environment = $3 AND created_at <= $4 AND finished_at <= $4
              AND finished_at > $4 - make_interval(secs => $5 * 60) AND status = ANY($7::text[])
        )
        SELECT w.m, count(r.finished_at) AS total, count(r.finished_at) FILTER (WHERE r.failed) AS failed
        FROM unnest($8::float8[]) AS w(m)
        LEFT JOIN r ON r.finished_at > $4 - make_interval(secs => w.m * 60)
        GROUP BY w.m
        """,
        rule.tenant_id, rule.flow_id, rule.environment, at, max(minutes), sorted(alerts.FAILED),
        sorted(alerts.OUTCOMES), minutes,
    )  # fmt: skip
    return {float(r["m"]): slo_burn.Counts(r["failed"], r["total"]) for r in rows}


async def tick(pool: asyncpg.Pool, now: datetime, *, lock_key: str) -> int:
    """The no_success clock: fire for every rule whose flow has been silent too long as of `now`. Takes the
    lock batches take, so a rebuild's swap never falls between reading the state and writing the alert."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext($1))", lock_key)
        rows = await conn.fetch(
            f"SELECT {', '.join('r.' + c for c in _RULE_COLUMNS.split(', '))} FROM alert_rules r "
            "LEFT JOIN alert_state s ON s.rule_id = r.id "
            "WHERE r.kind = 'no_success' AND NOT coalesce(s.open, false) ORDER BY r.id FOR KEY SHARE OF r"
        )
        if not rows:
            return 0
        seen = await _states(conn, [r["id"] for r in rows])
        due = [r for r in rows if alerts.overdue(rule_from(r), seen.get(r["id"], State()), now)[1]]
        if not due:
            return 0
        # Look again under the lock: a batch may have folded a success in meanwhile.
        states = await _lock_states(conn, [r["id"] for r in due])
        outcome = _Outcome()
        for row in due:
            rule = rule_from(row)
            state, fires = alerts.overdue(rule, states[rule.id], now)
            if fires:
                outcome.rules[rule.id] = (rule, row["channels"])
                outcome.apply(rule, fires)
                await _save_states(conn, {rule.id: state})
        return await _record(conn, outcome, deliver=True)


async def _lock_states(conn: asyncpg.Connection, rule_ids: list[str]) -> dict[str, State]:
    """Rows locked in id order: two projectors (or a projector and the clock) never fold one rule at once."""
    await conn.execute(
        "INSERT INTO alert_state (rule_id) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT DO NOTHING", rule_ids
    )
    return await _states(conn, rule_ids, lock=True)


async def _states(conn: asyncpg.Connection, rule_ids: list[str], *, lock: bool = False) -> dict[str, State]:
    rows = await conn.fetch(
        'SELECT rule_id, consecutive, last_success_at, last_success_run_id, open, "window", updated_at '
        f"FROM alert_state WHERE rule_id = ANY($1::text[]) ORDER BY rule_id {'FOR UPDATE' if lock else ''}",
        rule_ids,
    )
    return {
        r["rule_id"]: State(
            consecutive=r["consecutive"], last_success_at=r["last_success_at"],
            last_success_run_id=r["last_success_run_id"], open=r["open"], updated_at=r["updated_at"],
            window=tuple((datetime.fromisoformat(t), bool(f)) for t, f in r["window"]),
        )
        for r in rows
    }  # fmt: skip


async def _save_states(conn: asyncpg.Connection, states: dict[str, State]) -> None:
    if not states:
        return
    await conn.executemany(
        """
        UPDATE alert_state SET consecutive = $2, last_success_at = $3, last_success_run_id = $4, open = $5,
                               "window" = $6, updated_at = $7
        WHERE rule_id = $1
        """,
        [(rid, s.consecutive, s.last_success_at, s.last_success_run_id, s.open,
          [[t.isoformat(), f] for t, f in s.window], s.updated_at) for rid, s in states.items()],
    )  # fmt: skip


async def _record(conn: asyncpg.Connection, outcome: _Outcome, *, deliver: bool) -> int:
    """Resolve earlier open alerts first (an alert fired in this batch is resolved only by what followed it),
    then insert the new ones; enqueue a delivery per channel for each fired and each resolved alert."""
    resolved: list[dict[str, Any]] = []
    if outcome.resolve_stored:
        items = list(outcome.resolve_stored.items())
        rows = await conn.fetch(
            f"""
            UPDATE alert_events a SET resolved_at = u.at, resolved_by_run_id = u.run
            FROM unnest($1::text[], $2::timestamptz[], $3::text[]) AS u(rule, at, run)
            WHERE a.rule_id = u.rule AND a.resolved_at IS NULL
            RETURNING {", ".join("a." + c for c in _ALERT_COLUMNS.split(", "))}
            """,
            [k for k, _ in items], [r.at for _, r in items], [r.run_id for _, r in items],
        )  # fmt: skip
        resolved = [dict(r) for r in rows]
    fired = list(outcome.fired.values())
    inserted: set[str] = set()
    if fired:
        cols = ("id", "tenant_id", "environment", "rule_id", "flow_id", "kind", "run_id", "fired_at", "reason",
                "payload", "resolved_at", "resolved_by_run_id")  # fmt: skip
        types = ("text", "text", "text", "text", "text", "text", "text", "timestamptz", "text", "text",
                 "timestamptz", "text")  # fmt: skip
        rows = await conn.fetch(
            f"INSERT INTO alert_events ({', '.join(cols)}) "
            f"SELECT {', '.join('u.payload::jsonb' if c == 'payload' else 'u.' + c for c in cols)} "
            f"FROM unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(types))}) AS u({', '.join(cols)}) "
            "ON CONFLICT (id) DO NOTHING RETURNING id",
            *[[codec.dumps(a[c]).decode() if c == "payload" else a[c] for a in fired] for c in cols],
        )  # fmt: skip
        inserted = {r["id"] for r in rows}
    if deliver:
        offers = [("trigger", a) for a in fired if a["id"] in inserted]
        offers += [("resolve", a) for a in fired if a["id"] in inserted and a["resolved_at"] is not None]
        offers += [("resolve", a) for a in resolved]
        await _enqueue(conn, outcome, offers)
    return len(inserted) + len(resolved)


def alert_view(a: dict[str, Any]) -> dict[str, Any]:
    """An alert as channels and the API show it (times as ISO strings)."""
    out = {c: a[c] for c in _ALERT_COLUMNS.split(", ")}
    for c in ("fired_at", "resolved_at"):
        out[c] = out[c].isoformat() if out[c] is not None else None
    return out


async def _enqueue(conn: asyncpg.Connection, outcome: _Outcome, offers: list[tuple[str, dict[str, Any]]]) -> None:
    rows: list[tuple[Any, ...]] = []
    for action, a in offers:
        rule, channels = outcome.rules[a["rule_id"]]
        view = alert_view(a)
        for i, channel in enumerate(channels):
            did = alerts.delivery_id(a["id"], action, i)
            body = alerts.render(channel, action, view, rule, did)
            email = channel["type"] == "email"
            target = ", ".join(channel["to"]) if email else channel.get("url", PAGERDUTY_URL)
            rows.append((did, a["id"], rule.id, rule.tenant_id, action, i, channel["type"], target,
                         codec.dumps(body).decode()))  # fmt: skip
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO alert_deliveries (id, alert_id, rule_id, tenant_id, action, channel_index, channel_type, target,
                                      body, next_attempt_at)
        SELECT i, a, r, t, ac, c, ct, tg, b::jsonb, now()
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::text[], $8::text[],
                    $9::text[]) AS u(i, a, r, t, ac, c, ct, tg, b)
        ON CONFLICT (alert_id, action, channel_index) DO NOTHING
        """,
        *[list(c) for c in zip(*rows, strict=True)],
    )


_QUEUE = Queue(
    table="alert_deliveries",
    owner="alert_rules",
    owner_match="o.id = d.rule_id",
    columns="d.action, d.channel_type, d.target, d.body, o.secret",
)


class Dispatcher:
    """Like the webhook dispatcher (services/common/outbox.py): claims due deliveries with a lease, sends each to
    its channel, logs every attempt on the delivery and retries failures with exponential backoff for up to 24
    hours."""

    def __init__(self, settings: ProjectorSettings, lease_s: float = 60) -> None:
        self.settings = settings
        # Resolved once, checked and pinned per connection: the guard is where the delivery connects.
        self.client = guarded_client(settings.webhook_allow_private_networks, timeout=10, follow_redirects=False)
        self.outbox = Outbox(_QUEUE, self._send, backoff_s=settings.alert_backoff_s, lease_s=lease_s,
                             noun="alert delivery", journal=_journal)  # fmt: skip
        self.pages = Outbox(oncall.QUEUE, self._send, backoff_s=settings.alert_backoff_s, lease_s=lease_s,
                            noun="on-call page")  # fmt: skip

    async def close(self) -> None:
        await self.client.aclose()

    async def run_once(self, pool: asyncpg.Pool, limit: int = 50) -> int:
        return len(await self.outbox.run_once(pool, limit)) + len(await self.pages.run_once(pool, limit))

    async def _send(self, d: asyncpg.Record) -> int | None:
        if d["channel_type"] == "email":
            await asyncio.to_thread(self._mail, d["target"], d["body"])
            return None
        await check_url(d["target"], allow_private=True)  # scheme and host; the address where it connects
        body = codec.dumps(d["body"])
        headers = {"Content-Type": "application/json"}
        if d["channel_type"] == "oncall":
            headers |= {"X-Flowtrail-Event": d["body"]["event"], "X-Flowtrail-Delivery": d["id"]}
        if d["channel_type"] == "webhook":
            headers |= {"X-Flowtrail-Event": d["body"]["event"], "X-Flowtrail-Delivery": d["id"],
                        "X-Flowtrail-Signature": sign(d["secret"], body)}  # fmt: skip
        response = await self.client.post(d["target"], content=body, headers=headers)
        return response.status_code

    def _mail(self, to: str, body: dict[str, Any]) -> None:
        """Blocking smtplib, run in a thread: one message to every recipient of the channel."""
        s = self.settings
        if not s.smtp_host:
            raise smtplib.SMTPException("FLOWTRAIL_PROJECTOR_SMTP_HOST is not set")
        message = EmailMessage()
        message["From"] = s.smtp_from
        message["To"] = to
        message["Subject"] = body["subject"]
        message.set_content(body["text"])
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s) as smtp:
            if s.smtp_starttls:
                smtp.starttls()
            if s.smtp_username:
                smtp.login(s.smtp_username, s.smtp_password)
            smtp.send_message(message)


async def _journal(conn: asyncpg.Connection, d: asyncpg.Record, attempt: Attempt) -> None:
    """Alert deliveries keep their attempts in the row (`attempt_log`, shown by GET /v1/alerts/{id})."""
    entry = {"attempt": attempt.number, "at": attempt.at.isoformat(), "status_code": attempt.status_code,
             "error": attempt.error, "duration_ms": round(attempt.duration_ms, 3)}  # fmt: skip
    await conn.execute(
        "UPDATE alert_deliveries SET attempt_log = attempt_log || $2::jsonb WHERE id = $1", d["id"], [entry]
    )
