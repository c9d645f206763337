"""The outbox dispatcher shared by webhook and alert deliveries: claim due rows with a lease, send each, record
the attempt, retry with exponential backoff, give up after 24 hours.

A delivery row is enqueued in the same transaction as the read-model change that caused it (the projector's
batch), so it is sent at least once; several dispatchers (one per projector process) share the table safely:
a claim moves the row's `next_attempt_at` a lease ahead, and `FOR UPDATE SKIP LOCKED` keeps two claims apart.
The table has `id`, `status` (pending, delivered, failed), `attempts`, `first_attempt_at`, `next_attempt_at`,
`last_status_code`, `last_error` and `delivered_at`; the outbox's owner table (the subscription, the rule)
supplies what sending needs (the URL, the signing secret).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from services.common.netguard import BlockedAddress, UnresolvableHost

log = logging.getLogger(__name__)

RETRY_FOR = timedelta(hours=24)
MAX_DELAY_S = 3600


@dataclass(frozen=True)
class Queue:
    """Where deliveries wait: `table d` joined to `owner o` on `owner_match`; `columns` are what sending needs."""

    table: str
    owner: str
    owner_match: str
    columns: str

    def claim_sql(self) -> str:
        return f"""
            UPDATE {self.table} d SET next_attempt_at = now() + make_interval(secs => $1),
                   first_attempt_at = COALESCE(d.first_attempt_at, now())
            FROM {self.owner} o
            WHERE d.id IN (SELECT id FROM {self.table} WHERE status = 'pending' AND next_attempt_at <= now()
                           ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
              AND {self.owner_match}
            RETURNING d.id, d.attempts, d.first_attempt_at, {self.columns}
            """


@dataclass(frozen=True)
class Attempt:
    """One try at one delivery, and the status the delivery takes after it."""

    number: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    status: str  # delivered, pending (retried at next_attempt_at) or failed (gave up)
    next_attempt_at: datetime


Send = Callable[[asyncpg.Record], Awaitable[int | None]]
"""Sends one claimed delivery: the HTTP status it was answered with (None where there is none, as for an email);
raises on failure."""
Journal = Callable[[asyncpg.Connection, asyncpg.Record, Attempt], Awaitable[None]]
"""Records an attempt beside the delivery's own columns (in the same transaction)."""


class Outbox:
    """Claims due deliveries of one queue, sends each through `send`, records every attempt (`journal`, then the
    delivery's status) and retries failures with exponential backoff: 1x, 2x, 4x … `backoff_s`, at most an hour
    apart, until an attempt would fall later than 24 hours after the first."""

    def __init__(
        self, queue: Queue, send: Send, *, backoff_s: float, lease_s: float, noun: str, journal: Journal | None = None
    ) -> None:
        self.queue = queue
        self.send = send
        self.journal = journal
        self.backoff_s = backoff_s
        self.lease_s = lease_s
        self.noun = noun  # in log lines: "webhook", "alert delivery"
        self._claim = queue.claim_sql()
        self._record = (
            f"UPDATE {queue.table} SET attempts = $2, status = $3, last_status_code = $4, last_error = $5, "
            "next_attempt_at = $6, delivered_at = CASE WHEN $3 = 'delivered' THEN $7::timestamptz END WHERE id = $1"
        )

    def delay(self, attempt: int) -> timedelta:
        """How long after attempt `attempt` the next one is due."""
        return timedelta(seconds=min(self.backoff_s * 2 ** (attempt - 1), MAX_DELAY_S))

    def settle(
        self, attempt: int, error: str | None, first_attempt_at: datetime, now: datetime
    ) -> tuple[str, datetime]:
        """The delivery's status after an attempt that ended at `now` with `error` (None: delivered), and when the
        next attempt is due: `failed` once that would fall more than RETRY_FOR after the first attempt."""
        retry_at = now + self.delay(attempt)
        if error is None:
            return "delivered", retry_at
        return ("failed" if retry_at > first_attempt_at + RETRY_FOR else "pending"), retry_at

    async def run_once(self, pool: asyncpg.Pool, limit: int = 50) -> list[Attempt]:
        """One pass: every due delivery (up to `limit`) tried once; the attempts made, in claim order."""
        due = await pool.fetch(self._claim, self.lease_s, limit)
        return [await self._deliver(pool, d) for d in due]

    async def _deliver(self, pool: asyncpg.Pool, d: asyncpg.Record) -> Attempt:
        number = d["attempts"] + 1
        started = time.perf_counter()
        code: int | None = None
        error: str | None = None
        try:
            code = await self.send(d)
            if code is not None and not 200 <= code < 300:
                error = f"answered {code}"
        except BlockedAddress as exc:
            error = f"refused: {exc}"
        except UnresolvableHost as exc:
            error = f"unresolvable: {exc}"
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:  # smtplib's errors are OSErrors too
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # whatever one delivery raises is its failed attempt, never the batch's
            log.exception("%s %s attempt %d raised", self.noun, d["id"], number)
            error = f"{type(exc).__name__}: {exc}"
        now = datetime.now(UTC)
        status, retry_at = self.settle(number, error, d["first_attempt_at"], now)
        attempt = Attempt(number, now, code, error, (time.perf_counter() - started) * 1000, status, retry_at)
        async with pool.acquire() as conn, conn.transaction():
            if self.journal is not None:
                await self.journal(conn, d, attempt)
            await conn.execute(self._record, d["id"], number, status, code, error, retry_at, now)
        if error is not None:
            log.info("%s %s attempt %d: %s (%s)", self.noun, d["id"], number, error, status)
        return attempt
