"""Per-key sliding-window rate limits (docs/api-contract.md), kept in PostgreSQL so every API and ingest process
shares them.

Reads (GET/HEAD) 600, writes (POST/PUT/PATCH/DELETE) 120 and triggers (POST /v1/flows/{id}/trigger and
/v1/actions/{name}/async|live, on either service: one budget) 60 requests per minute by default. Each request costs
one upsert: the key's row holds the admitted counts of the current and the previous fixed window, and the estimate
`previous * overlap + current` approximates a true sliding window (Cloudflare's "sliding window counter"). Only
admitted requests count, so a client that keeps retrying while limited is let in again as soon as the window has
slid far enough.

The upserts of requests that arrive while one is on its way travel together in the next round trip (asyncpg
pipelines them in one transaction), each still its own statement, so every request is counted exactly as if
it had been sent alone: busy processes pay about one round trip per batch instead of one per request.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.http import ApiError

CLASSES = ("reads", "writes", "triggers")
# Every route that starts runs (services/common/trigger_routes.py), at ingest's port and the API's alike.
_TRIGGER_PATH = re.compile(r"^/v1/(flows/[^/]+/trigger|actions/[^/]+/(async|live))$")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Where the auth dependency leaves the headers for RateLimitHeaders (request.state is scope["state"]).
_STATE_KEY = "rate_limit_headers"
_HEADER_NAMES = frozenset({b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset"})

# One statement, one round trip. ON CONFLICT DO UPDATE locks the key's row, so concurrent requests from any
# number of processes are counted one after another. Time is the database's clock, which every process shares;
# `greatest` keeps a request that read the clock a moment before a concurrent one from rolling the window back.
_HIT = """
INSERT INTO rate_limit_windows AS r (key_id, class, window_start, current, previous, at, admitted)
SELECT $1, $2, floor(c.t / $4::bigint)::bigint * $4::bigint, 1, 0, c.t, true
FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS t) AS c
ON CONFLICT (key_id, class) DO UPDATE SET (window_start, previous, current, at, admitted) = (
    SELECT s.ws, s.prev, s.cur + s.ok::int, s.t, s.ok
    FROM (
        SELECT n.ws, n.t, k.prev, k.cur, k.prev * (1 - (n.t - n.ws) / $4::bigint) + k.cur + 1 <= $3::int AS ok
        FROM (SELECT greatest(r.window_start, excluded.window_start) AS ws, greatest(r.at, excluded.at) AS t) AS n,
        LATERAL (
            SELECT CASE WHEN r.window_start = n.ws THEN r.current ELSE 0 END AS cur,
                   CASE WHEN r.window_start = n.ws THEN r.previous
                        WHEN r.window_start = n.ws - $4::bigint THEN r.current ELSE 0 END AS prev
        ) AS k
    ) AS s
)
RETURNING window_start, previous, current, at, admitted
"""


class RateLimitSettings(Protocol):
    """The fields the API and ingest settings both declare (`FLOWTRAIL_<SERVICE>_RATE_LIMIT_…`)."""

    rate_limit_enabled: bool
    rate_limit_reads: int
    rate_limit_writes: int
    rate_limit_triggers: int
    rate_limit_window_s: int


@dataclass(frozen=True, slots=True)
class Limits:
    reads: int = 600
    writes: int = 120
    triggers: int = 60
    window_s: int = 60

    def of(self, klass: str) -> int:
        return int(getattr(self, klass))


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    limit: int
    remaining: int
    reset_at: int  # unix seconds: the end of the current window, or when a refused request may retry
    retry_after_s: int  # 0 when admitted

    def headers(self) -> dict[str, str]:
        out = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }
        if not self.admitted:
            out["Retry-After"] = str(self.retry_after_s)
        return out


def classify(method: str, path: str) -> str:
    """Seed 003's three classes: triggers, other writes, reads."""
    if method in _READ_METHODS:
        return "reads"
    if method == "POST" and _TRIGGER_PATH.match(path):
        return "triggers"
    return "writes"


def decide(
    limit: int, window_s: int, window_start: int, previous: int, current: int, at: float, admitted: bool
) -> Decision:
    """Headers and, for a refused request, how long until one more would be admitted (the window's state after it)."""
    elapsed = at - window_start
    estimate = previous * (1 - elapsed / window_s) + current
    remaining = max(0, math.floor(limit - estimate))
    window_end = window_start + window_s
    if admitted:
        return Decision(True, limit, remaining, math.ceil(window_end), 0)
    if current + 1 <= limit:
        # Only the previous window's weight is in the way: wait until enough of it has slid out.
        wait = window_start + window_s * (1 - (limit - current - 1) / previous) - at
    else:
        # This window is full on its own: it becomes the previous one, which then has to slide out far enough.
        wait = window_end + window_s * (1 - (limit - 1) / current) - at
    retry_after = max(1, math.ceil(wait))
    return Decision(False, limit, 0, math.ceil(at) + retry_after, retry_after)


class RateLimiter:
    """Counts each authenticated request against its key's budget for the request's class."""

    def __init__(self, pool: asyncpg.Pool, limits: Limits) -> None:
        self.pool = pool
        self.limits = limits
        self._busy = False  # an upsert is on its way; later requests queue for the next batch
        self._queued: list[tuple[str, str, asyncio.Future[asyncpg.Record]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def hit(self, key_id: str, klass: str) -> Decision:
        if self._busy:
            future: asyncio.Future[asyncpg.Record] = asyncio.get_running_loop().create_future()
            self._queued.append((key_id, klass, future))
            row = await future
        else:
            self._busy = True
            try:
                row = await self.pool.fetchrow(_HIT, key_id, klass, self.limits.of(klass), self.limits.window_s)
            finally:
                self._hand_over()
        return self._decide(klass, row)

    def _decide(self, klass: str, row: asyncpg.Record) -> Decision:
        return decide(self.limits.of(klass), self.limits.window_s, row["window_start"], row["previous"],
                      row["current"], row["at"], row["admitted"])  # fmt: skip

    def _hand_over(self) -> None:
        """After a round trip: the queue goes next, in a task of its own so no one request's fate (a client
        gone, a cancellation) strands the others."""
        if self._queued:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                # One lock order for every process (by key, then class; arrival order within one), so two
                # batches holding rows of several keys in their transactions never deadlock each other.
                batch.sort(key=lambda q: (q[0], q[1]))
                args = [(key_id, klass, self.limits.of(klass), self.limits.window_s) for key_id, klass, _ in batch]
                try:
                    rows = await self.pool.fetchmany(_HIT, args)
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    self._queued += batch
                    raise
                for (_, _, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
        finally:
            # Only a cancelled drain (the process stopping) leaves requests queued: they end with it.
            for _, _, future in self._queued:
                future.cancel()
            self._queued = []
            self._busy = False
            self._drainer = None

    async def enforce(self, request: Request, key_id: str) -> None:
        """Once per request: counts it, leaves the headers for the response, raises 429 when over the limit."""
        if _STATE_KEY in request.scope.setdefault("state", {}):
            return
        decision = await self.hit(key_id, classify(request.method, request.scope["path"]))
        headers = decision.headers()
        request.scope["state"][_STATE_KEY] = [
            (k.lower().encode(), v.encode()) for k, v in headers.items() if k.startswith("X-RateLimit")
        ]
        if not decision.admitted:
            raise ApiError(
                429, "rate_limited",
                f"rate limit of {decision.limit} requests per {self.limits.window_s} s exceeded for this API key; "
                f"retry after {decision.retry_after_s} s",
                headers=headers,
            )  # fmt: skip


def rate_limiter(pool: asyncpg.Pool, settings: RateLimitSettings) -> RateLimiter | None:
    """The service's limiter, or None when limits are switched off (e.g. enforced by a gateway instead)."""
    if not settings.rate_limit_enabled:
        return None
    limits = Limits(
        settings.rate_limit_reads,
        settings.rate_limit_writes,
        settings.rate_limit_triggers,
        settings.rate_limit_window_s,
    )
    return RateLimiter(pool, limits)


async def forget_key(conn: asyncpg.Connection, key_id: str) -> None:
    """A revoked key's counters will never be read again."""
    await conn.execute("DELETE FROM rate_limit_windows WHERE key_id = $1", key_id)


class RateLimitHeaders:
    """Puts the X-RateLimit-* headers decided for the request on its response, whatever produced it.

    Errors raised after authentication (404, 409, 422, 429) and streamed responses are built away from the
    dependency that counted the request, so the headers are added here, at the ASGI level.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get(_STATE_KEY)
                if extra:
                    kept = [h for h in message.get("headers", []) if h[0].lower() not in _HEADER_NAMES]
                    message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)
