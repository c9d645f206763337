"""Per-key sliding-window rate limits (docs/api-contract.md#rate-limits), kept in PostgreSQL so every API and ingest
process shares them.

Reads (GET/HEAD) 600, writes (POST/PUT/PATCH/DELETE) 120 and triggers (POST /v1/flows/{id}/trigger and
/v1/actions/{name}/async|live, on either service: one budget) 60 requests per minute by default. The key's row holds
the admitted counts of the current and the previous fixed window, and the estimate `previous * overlap + current`
approximates a true sliding window (Cloudflare's "sliding window counter"). Only admitted requests count, so a
client that keeps retrying while limited is let in again as soon as the window has slid far enough.

A key's requests that arrive while an upsert is on its way are counted together by its next one: one statement asks
for as many slots as requests wait, the database grants as many as the budget holds, first come first served, so
every request is counted exactly as if it had been sent alone. Keys of one batch travel in one pipelined round trip.

Once a key is busy in a process (several of its requests waiting at once), that process also reserves a block of
slots beyond them — at most 64, and at most 1/32 of the limit, so budgets under 64 never reserve any — and admits the
key's next requests from it with no round trip. A block lives `BLOCK_LEASE_S` (0.2 s) at most and never past its
window; slots it did not use are then given back to the window they were counted in. The database counts every
reserved slot at once, so the total admitted over all processes never exceeds the limit. The row also counts the
slots lent to blocks and not yet settled (`lent`, until `lent_until`): a request refused while some are out asks
again when they come back, so a budget held unused by one process is not refused to another. A process that dies
holding a block strands its slots until the window slides past them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.http import ApiError

log = logging.getLogger(__name__)

CLASSES = ("reads", "writes", "triggers")
# Every route that starts runs (services/common/trigger_routes.py), at ingest's port and the API's alike.
_TRIGGER_PATH = re.compile(r"^/v1/(flows/[^/]+/trigger|actions/[^/]+/(async|live))$")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Where the auth dependency leaves the headers for RateLimitHeaders (request.state is scope["state"]).
_STATE_KEY = "rate_limit_headers"
_HEADER_NAMES = frozenset({b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset"})

# One statement, one round trip: asks for $5 slots ($6 of them for requests waiting now, the rest a block to admit
# from locally), grants as many as the budget holds, and settles $8 slots of an earlier block used up. ON CONFLICT
# DO UPDATE locks the key's row, so concurrent requests from any number of processes are counted one after
# another. Time is the database's clock, which every process shares; `greatest` keeps a request that read the
# clock a moment before a concurrent one from rolling the window back. With $5 = $6 = 1 and $8 = 0 it is the
# plain per-request check: admitted when `previous * overlap + current + 1 <= limit`.
_TAKE = """
INSERT INTO rate_limit_windows AS r (key_id, class, window_start, current, previous, at, admitted, granted, lent,
                                     lent_until)
SELECT $1, $2, floor(c.t / $4::bigint)::bigint * $4::bigint, g.g, 0, c.t, g.g > 0, g.g, greatest(0, g.g - $6::int),
       CASE WHEN g.g > $6::int THEN c.t + $7::float8 ELSE 0 END
FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS t) AS c, LATERAL (
    SELECT least($5::int, greatest($3::int, 0)) AS g
) AS g
ON CONFLICT (key_id, class) DO UPDATE SET (window_start, previous, current, at, admitted, granted, lent,
                                           lent_until) = (
    SELECT s.ws, s.prev, s.cur + s.g, s.t, s.g > 0, s.g, greatest(0, r.lent - $8::int) + greatest(0, s.g - $6::int),
           CASE WHEN s.g > $6::int THEN greatest(r.lent_until, s.t + $7::float8) ELSE r.lent_until END
    FROM (
        SELECT e.ws, e.t, e.prev, e.cur,
               CASE WHEN e.est + $5::int <= $3::int THEN $5::int
                    WHEN e.est + 1 > $3::int THEN 0
                    ELSE least($5::int - 1, floor($3::int - e.est)::int) END AS g
        FROM (
            SELECT n.ws, n.t, k.prev, k.cur, k.prev * (1 - (n.t - n.ws) / $4::bigint) + k.cur AS est
            FROM (SELECT greatest(r.window_start, excluded.window_start) AS ws, greatest(r.at, excluded.at) AS t) AS n,
            LATERAL (
                SELECT CASE WHEN r.window_start = n.ws THEN r.current ELSE 0 END AS cur,
                       CASE WHEN r.window_start = n.ws THEN r.previous
                            WHEN r.window_start = n.ws - $4::bigint THEN r.current ELSE 0 END AS prev
            ) AS k
        ) AS e
    ) AS s
)
RETURNING window_start, previous, current, at, granted, lent, lent_until
"""
# Gives back a block's unused slots ($3) to the window they were counted in ($4: its start; by then perhaps the
# previous one), and settles its lent slots ($5).
_GIVE_BACK = """
UPDATE rate_limit_windows SET
    current = CASE WHEN window_start = $4::bigint THEN greatest(current - $3::int, 0) ELSE current END,
    previous = CASE WHEN window_start = $4::bigint + $6::bigint THEN greatest(previous - $3::int, 0)
                    ELSE previous END,
    lent = greatest(lent - $5::int, 0)
WHERE key_id = $1 AND class = $2
"""
# A block lives this long at most (and never past its window's end): the longest its unused slots stay away from
# the other processes, and the longest a request refused meanwhile waits for them.
BLOCK_LEASE_S = 0.2
# A block is at most this many slots, and at most 1/BLOCK_SHARE of the limit: below 2 * BLOCK_SHARE a process
# reserves nothing beyond the requests waiting, so small budgets are counted exactly as one upsert each.
MAX_BLOCK = 64
BLOCK_SHARE = 32
# How long past a lease's end a refused request still expects the lent slots back (the holder's give-back is a round
# trip of its own, on a loop that may be busy); a holder gone for good strands its slots only until the window slides.
LENT_GRACE_S = 0.3


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


_Key = tuple[str, str]  # (key id, class)


@dataclass(slots=True)
class _Reply:
    """The row of one upsert, as seen by the `index`-th of the requests it counted."""

    row: asyncpg.Record
    index: int


@dataclass(slots=True)
class _Block:
    """Slots reserved in the database beyond the requests that asked: admitted from here with no round trip."""

    window_start: int
    previous: int
    base: int  # the window's count before the block
    at: float  # database time of the reservation
    size: int
    used: int
    spare: int  # slots lent beyond the requests waiting at the reservation (the row's `lent` counts them)
    valid_until: float  # monotonic: the lease's end, or the window's if sooner
    settled: bool = False


class RateLimiter:
    """Counts each authenticated request against its key's budget for the request's class.

    A process that sees a key's requests arriving faster than its round trips reserves a block of slots in one
    upsert and admits from it locally (docs/api-contract.md#rate-limits); unused slots go back when the block's
    lease ends. At low rates each request is one upsert, exactly counted, as it always was.
    """

    def __init__(self, pool: asyncpg.Pool, limits: Limits, lease_s: float = BLOCK_LEASE_S) -> None:
        self.pool = pool
        self.limits = limits
        self.lease_s = lease_s
        self._busy = False  # an upsert is on its way; later requests queue for the next batch
        self._queued: list[tuple[str, str, asyncio.Future[_Reply | Decision]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._blocks: dict[_Key, _Block] = {}
        self._target: dict[_Key, int] = {}  # the block size a busy key asks for next
        self._to_settle: dict[_Key, int] = {}  # lent slots of used-up blocks, settled by the key's next upsert
        self._background: set[asyncio.Task[None]] = set()

    async def hit(self, key_id: str, klass: str) -> Decision:
        deadline = None
        while True:
            local = self._from_block((key_id, klass))
            if local is not None:
                return local
            reply = await self._ask(key_id, klass)
            if isinstance(reply, Decision):  # a slot of a block that arrived while it queued
                return reply
            row = reply.row
            if reply.index < row["granted"]:
                current = row["current"] - row["granted"] + reply.index + 1
                return self._decide(klass, row["window_start"], row["previous"], current, row["at"], True)
            # Refused while slots lent to some process's block are still out: they come back when its lease ends
            # (give or take the holder's round trip), so the request asks again then, before it is refused.
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + self.lease_s + LENT_GRACE_S
            if row["lent"] <= 0 or row["at"] > row["lent_until"] + LENT_GRACE_S or now >= deadline:
                return self._decide(klass, row["window_start"], row["previous"], row["current"], row["at"], False)
            await asyncio.sleep(min(self.lease_s / 4, deadline - now))

    def _decide(self, klass: str, window_start: int, previous: int, current: int, at: float, ok: bool) -> Decision:
        return decide(self.limits.of(klass), self.limits.window_s, window_start, previous, current, at, ok)

    def _from_block(self, key: _Key) -> Decision | None:
        block = self._blocks.get(key)
        if block is None:
            return None
        if block.used < block.size and time.monotonic() < block.valid_until:
            block.used += 1
            return self._decide(key[1], block.window_start, block.previous, block.base + block.used, block.at, True)
        self._end(key, block)
        return None

    def _end(self, key: _Key, block: _Block) -> None:
        """A block is done: used up (its lent slots settled by the key's next upsert, which asks for a bigger
        one) or expired (unused slots given back now, the next block sized to what this one admitted)."""
        if self._blocks.get(key) is block:
            del self._blocks[key]
        if block.settled:
            return
        block.settled = True
        unused = block.size - block.used
        if unused == 0 and time.monotonic() < block.valid_until:
            self._to_settle[key] = self._to_settle.get(key, 0) + block.spare
            self._target[key] = min(self._cap(key[1]), 2 * max(self._target.get(key, 0), block.size))
            return
        self._target[key] = block.used
        task = asyncio.get_running_loop().create_task(self._give_back(key, block, unused))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back(self, key: _Key, block: _Block, unused: int) -> None:
        try:
            await self.pool.execute(_GIVE_BACK, key[0], key[1], unused, block.window_start, block.spare,
                                    self.limits.window_s)  # fmt: skip
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # Not given back: the slots count until the window slides past them, and lent_until ends the waits.
            log.warning("rate limit: %d unused slots of %s not given back: %r", unused, key[1], exc)

    def _cap(self, klass: str) -> int:
        return min(MAX_BLOCK, self.limits.of(klass) // BLOCK_SHARE)

    async def _ask(self, key_id: str, klass: str) -> _Reply | Decision:
        future: asyncio.Future[_Reply | Decision] = asyncio.get_running_loop().create_future()
        self._queued.append((key_id, klass, future))
        if not self._busy:
            self._busy = True
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Sends the queued requests, one upsert per key and class, in one pipelined round trip; then the requests
        that queued meanwhile, in a task of its own so no one request's fate (a client gone, a cancellation)
        strands the others."""
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                groups: dict[_Key, list[asyncio.Future[_Reply | Decision]]] = {}
                for key_id, klass, future in batch:
                    if future.done():
                        continue
                    groups.setdefault((key_id, klass), []).append(future)
                # Requests that queued while a block was on its way take its slots.
                for key in list(groups):
                    while groups[key] and (decision := self._from_block(key)) is not None:
                        groups[key].pop(0).set_result(decision)
                    if not groups[key]:
                        del groups[key]
                if not groups:
                    continue
                # One lock order for every process (by key, then class), so two batches holding rows of several
                # keys in their transactions never deadlock each other.
                keys = sorted(groups)
                args = []
                for key in keys:
                    demand = len(groups[key])
                    ask, settle = self._asking(key, demand), self._to_settle.pop(key, 0)
                    limit = self.limits.of(key[1])
                    args.append((key[0], key[1], limit, self.limits.window_s, ask, demand, self.lease_s, settle))
                sent = time.monotonic()
                try:
                    rows = await (self.pool.fetchmany(_TAKE, args) if len(args) > 1
                                  else self._one(args[0]))  # fmt: skip
                except Exception as exc:
                    for key in keys:
                        for future in groups[key]:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                except BaseException:
                    self._queued += [(k[0], k[1], f) for k in keys for f in groups[k]]
                    raise
                for key, row in zip(keys, rows, strict=True):
                    waiting = groups[key]
                    for index, future in enumerate(waiting):
                        if not future.done():
                            future.set_result(_Reply(row, index))
                    self._reserve(key, row, len(waiting), sent)
        finally:
            # Only a cancelled drain (the process stopping) leaves requests queued: they end with it.
            for _, _, future in self._queued:
                future.cancel()
            self._queued = []
            self._busy = False
            self._drainer = None

    def _asking(self, key: _Key, demand: int) -> int:
        """Slots to ask for: the requests waiting, and a block beside them once the key is busy (several requests
        waiting at once, or its last block used up within its lease)."""
        cap = self._cap(key[1])
        if cap < 2:
            return demand
        target = self._target.get(key, 0)
        if demand > 1:
            target = self._target[key] = max(target, min(cap, 2 * demand))
        return max(demand, target)

    async def _one(self, args: tuple[object, ...]) -> list[asyncpg.Record]:
        row = await self.pool.fetchrow(_TAKE, *args)
        assert row is not None
        return [row]

    def _reserve(self, key: _Key, row: asyncpg.Record, demand: int, sent: float) -> None:
        """Keeps the slots granted beyond the requests that asked as the key's block, until its lease ends."""
        spare = row["granted"] - demand
        if spare <= 0:
            return
        window_left = row["window_start"] + self.limits.window_s - row["at"]
        block = _Block(row["window_start"], row["previous"], row["current"] - row["granted"], row["at"],
                       row["granted"], demand, spare, sent + min(self.lease_s, window_left))  # fmt: skip
        previous = self._blocks.get(key)
        if previous is not None:
            self._end(key, previous)
        self._blocks[key] = block
        asyncio.get_running_loop().call_later(max(0.0, block.valid_until - time.monotonic()), self._expire, key, block)

    def _expire(self, key: _Key, block: _Block) -> None:
        if not block.settled:
            self._end(key, block)

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
