"""`Idempotency-Key` on every write (POST, PUT, PATCH, DELETE) of ingest and the API, with Stripe's semantics.

- The first request with a key runs; its answer is stored. The same key with the same request (method, path,
  query and body) within `ttl_s` answers that stored result — the same run ids — with `Idempotent-Replayed: true`,
  and changes nothing.
- The same key with a different request is 422 `idempotency_key_reused`.
- Requests with a key that is still running wait for its result: in this process on a future, across processes by
  polling the shared row. A request abandoned by a dead process is taken over once its lease ends.
- Only answers of requests that did something are stored (2xx). A 4xx (the request was refused: bad input, an
  unknown or paused flow, a rate limit) or a 5xx (Kafka unavailable, an append that did not complete) releases the
  key, so a corrected request or a retry with it runs again. Ingest derives run ids from the key, so that retry
  names the same runs and the executor starts each once (invariant 9).

Keys are scoped by the caller's tenant and environment. A request whose bearer key does not authenticate passes
through untouched and gets its 401 from the route.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.bodylimit import send_error
from services.common.http import BAD_INPUT, DATABASE_DOWN, ApiError

log = logging.getLogger(__name__)

HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Not part of a stored answer: they describe the request that carried them, not the result.
_SKIP_HEADERS = frozenset({b"x-request-id", b"content-length", b"date", b"server", b"retry-after"})
_SKIP_PREFIX = b"x-ratelimit-"
_ANSWERED = "idempotency_answered"  # scope state: the response has started, no error envelope can follow
_NS = uuid.UUID("5b0b7a40-8f5e-4b1e-9a55-1f0d3c2b7e11")

_CLAIM = """
INSERT INTO idempotency_keys AS k (tenant_id, environment, key, fingerprint, method, path, state, lease_until)
VALUES ($1, $2, $3, $4, $5, $6, 'running', clock_timestamp() + make_interval(secs => $7))
ON CONFLICT (tenant_id, environment, key) DO UPDATE
SET fingerprint = excluded.fingerprint, method = excluded.method, path = excluded.path, state = 'running',
    lease_until = excluded.lease_until, status = NULL, headers = NULL, body = NULL, created_at = clock_timestamp()
WHERE k.created_at < clock_timestamp() - make_interval(secs => $8)
   OR (k.state = 'running' AND k.lease_until < clock_timestamp() AND k.fingerprint = excluded.fingerprint)
RETURNING created_at
"""
_READ = """
SELECT fingerprint, state, status, headers, body FROM idempotency_keys
WHERE tenant_id = $1 AND environment = $2 AND key = $3
"""


def derived_run_ids(tenant_id: str, environment: str, key: str, count: int) -> list[str]:
    """The run ids of a request made with an idempotency key: the same for every retry of that request, so a
    retry after a partial failure appends the same runs and the executor starts each once. Same shape as
    `new_run_id` (`run_` + 28 hex digits)."""
    base = f"{tenant_id}\x1f{environment}\x1f{key}\x1f"
    return ["run_" + uuid.uuid5(_NS, f"{base}{i}").hex[:28] for i in range(count)]


def idempotency_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's Idempotency-Key header (already validated by the middleware), if any."""
    for name, value in headers:
        if name == HEADER:
            return str(value.decode("latin-1"))
    return None


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class Idempotency:
    """ASGI middleware; sits inside the request id and body limit middlewares (it reads the whole body)."""

    def __init__(self, app: ASGIApp, *, ttl_s: float = 86_400.0, lease_s: float = 120.0, wait_s: float = 60.0) -> None:
        self.app = app
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.wait_s = wait_s
        # (tenant, environment, key) -> (fingerprint, the running request's answer)
        self._running: dict[tuple[str, str, str], tuple[bytes, asyncio.Future[Stored]]] = {}
        self._claims = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WRITE_METHODS:
            await self.app(scope, receive, send)
            return
        key = idempotency_key(scope["headers"])
        if key is None:
            await self.app(scope, receive, send)
            return
        if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            await send_error(scope, send, 400, "invalid_request",
                             f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")  # fmt: skip
            return
        app_state = scope["app"].state
        authorization = next((v.decode("latin-1") for n, v in scope["headers"] if n == b"authorization"), None)
        try:
            principal = await app_state.authenticator.principal(authorization)
        except ApiError:
            await self.app(scope, receive, send)  # the route answers 401 as it always does
            return
        except DATABASE_DOWN:  # the key looked up while PostgreSQL is away or starting up: nothing ran yet
            await _database_unavailable(scope, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope.get("state", {}).get(BAD_INPUT) is not None:
            # NUL bytes, lone surrogates, numbers out of range: nothing to remember; the route answers its 4xx.
            await self.app(scope, _once(body), send)
            return
        fingerprint = hashlib.sha256(
            b"\n".join((scope["method"].encode(), scope["path"].encode(), scope.get("query_string", b""), body))
        ).digest()
        ident = (principal.tenant_id, principal.environment, key)
        try:
            stored = await self._answer(scope, send, ident, fingerprint, body, app_state.pool)
        except DATABASE_DOWN:
            if scope.get("state", {}).get(_ANSWERED):
                raise
            await _database_unavailable(scope, send)
            return
        if stored is not None:
            await _replay(send, stored, scope)

    async def _answer(
        self, scope: Scope, send: Send, ident: tuple[str, str, str], fingerprint: bytes, body: bytes, pool: asyncpg.Pool
    ) -> Stored | None:
        """The stored or shared answer to send, or None when this request ran and answered itself."""
        local = self._running.get(ident)
        if local is not None:
            if local[0] != fingerprint:
                return _reused(ident[2])
            return await asyncio.shield(local[1])
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        self._running[ident] = (fingerprint, future)
        try:
            deadline = time.monotonic() + self.wait_s
            delay = 0.02
            while True:
                claimed, row = await self._claim(pool, ident, fingerprint, scope)
                if claimed:
                    stored = await self._run(scope, send, body, pool, ident)
                    future.set_result(stored)
                    return None
                if row is None and time.monotonic() < deadline:
                    continue  # released between our claim and our read: claim again
                if row is not None and bytes(row["fingerprint"]) != fingerprint:
                    stored = _reused(ident[2])
                    future.set_result(stored)
                    return stored
                if row is not None and row["state"] == "done":
                    stored = _stored(row)
                    future.set_result(stored)
                    return stored
                if time.monotonic() > deadline:
                    stored = Stored(409, [(b"content-type", b"application/json"), (b"retry-after", b"1")], orjson.dumps(
                        {"error": {"code": "idempotency_key_in_use", "request_id": "",
                                   "message": f"a request with Idempotency-Key {ident[2]!r} is still running; "
                                              "retry after it ends to get its result"}}))  # fmt: skip
                    future.set_result(stored)
                    return stored
                await asyncio.sleep(delay)  # another process runs it: wait for its answer
                delay = min(delay * 2, 0.5)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            self._running.pop(ident, None)

    async def _claim(
        self, pool: asyncpg.Pool, ident: tuple[str, str, str], fingerprint: bytes, scope: Scope
    ) -> tuple[bool, asyncpg.Record | None]:
        async with pool.acquire() as conn:
            created = await conn.fetchval(_CLAIM, *ident, fingerprint, scope["method"], scope["path"],
                                          self.lease_s, self.ttl_s)  # fmt: skip
            if created is not None:
                self._claims += 1
                if random.random() < 0.01:  # keys older than the ttl are dead weight: sweep now and then
                    await conn.execute(
                        "DELETE FROM idempotency_keys WHERE created_at < clock_timestamp() - make_interval(secs => $1)",
                        self.ttl_s,
                    )
                return True, None
            return False, await conn.fetchrow(_READ, *ident)

    async def _run(
        self, scope: Scope, outer_send: Send, body: bytes, pool: asyncpg.Pool, ident: tuple[str, str, str]
    ) -> Stored:
        """Runs the request, answering the client as it goes, and stores (or releases) the key."""
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        parts: list[bytes] = []
        receive_body = _once(body)

        async def capture(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                scope.setdefault("state", {})[_ANSWERED] = True
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
            await outer_send(message)

        try:
            await self.app(scope, receive_body, capture)
        except BaseException:
            await self._release(pool, ident)
            raise
        stored = Stored(status, [(k, v) for k, v in headers if k.lower() not in _SKIP_HEADERS
                                 and not k.lower().startswith(_SKIP_PREFIX)], b"".join(parts))  # fmt: skip
        # Only what the request did is kept (Stripe's rule): a refusal (4xx: bad input, an unknown flow, a paused one,
        # a rate limit) or a failure (5xx) changed nothing, so the key stays free for the corrected or later request.
        if status >= 400:
            await self._release(pool, ident)
            return stored
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET state = 'done', status = $4, headers = $5, body = $6 "
                "WHERE tenant_id = $1 AND environment = $2 AND key = $3",
                *ident, status, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in stored.headers], stored.body,
            )  # fmt: skip
        return stored

    async def _release(self, pool: asyncpg.Pool, ident: tuple[str, str, str]) -> None:
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND environment = $2 AND key = $3 "
                    "AND state = 'running'",
                    *ident,
                )
        except (asyncpg.PostgresError, OSError) as exc:
            # Its lease ends it: a retry takes the key over then.
            log.warning("could not release idempotency key %r: %r", ident[2], exc)


def _once(body: bytes) -> Receive:
    """A `receive` that hands the app the body already read, then a disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _stored(row: asyncpg.Record) -> Stored:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in row["headers"]]
    return Stored(row["status"], headers, bytes(row["body"]))


def _reused(key: str) -> Stored:
    return Stored(422, [(b"content-type", b"application/json")], orjson.dumps({"error": {
        "code": "idempotency_key_reused", "request_id": "",
        "message": f"Idempotency-Key {key!r} was used with a different request (method, path or body) in the "
                   "last 24 hours; use a new key for a new request",
    }}))  # fmt: skip


async def _database_unavailable(scope: Scope, send: Send) -> None:
    await send_error(scope, send, 503, "database_unavailable",
                     "PostgreSQL is unavailable; nothing was changed: retry after a moment",
                     {"Retry-After": "2"})  # fmt: skip


async def _replay(send: Send, stored: Stored, scope: Scope) -> None:
    body = stored.body
    rid = str(scope.get("state", {}).get("request_id", ""))
    if stored.status >= 400 and body.startswith(b'{"error"'):
        try:  # the envelope names this request, not the first one
            envelope = orjson.loads(body)
            envelope["error"]["request_id"] = rid
            body = orjson.dumps(envelope)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    headers = [*stored.headers, (b"content-length", str(len(body)).encode()), (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
