"""API keys: `ft_live_…`/`ft_test_…`, 256 random bits, stored only as a SHA-256 hash, found by prefix.

Every request's key resolves to a Principal (tenant, environment, scopes); all queries and
commands are scoped by it (invariant 7).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from fastapi import Request

from services.common.contract import SCOPE_ATTRIBUTE
from services.common.http import ApiError, check_query_names, raise_bad_input
from services.common.ratelimit import RateLimiter

ALL_SCOPES = ("runs:read", "runs:write", "flows:write", "data:read", "admin")
PREFIX_BY_ENVIRONMENT = {"PRODUCTION": "ft_live_", "TESTING": "ft_test_"}
_LOOKUP_CHARS = 12
_KEY_CHARS = re.compile(r"[A-Za-z0-9_-]{1,200}")
_CACHE_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tenant_id: str
    environment: str
    scopes: frozenset[str]


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _split(key: str) -> tuple[str, str] | None:
    if not _KEY_CHARS.fullmatch(key):
        return None  # never a key we issued; and text such as NUL must not reach the prefix lookup
    for environment, prefix in PREFIX_BY_ENVIRONMENT.items():
        if key.startswith(prefix) and len(key) > len(prefix) + _LOOKUP_CHARS:
            return environment, key[len(prefix) : len(prefix) + _LOOKUP_CHARS]
    return None


async def ensure_tenant(conn: asyncpg.Connection, tenant_id: str, name: str) -> None:
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", tenant_id, name)


async def create_api_key(
    conn: asyncpg.Connection,
    tenant_id: str,
    *,
    environment: str = "PRODUCTION",
    scopes: Sequence[str] = ALL_SCOPES,
    name: str = "",
) -> tuple[str, str]:
    """Returns (key_id, plaintext key). The plaintext is shown once and never stored."""
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    key = PREFIX_BY_ENVIRONMENT[environment] + secret
    key_id = "key_" + uuid.uuid4().hex[:16]
    await conn.execute(
        """
        INSERT INTO api_keys (id, tenant_id, name, prefix, key_hash, environment, scopes)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        """,
        key_id, tenant_id, name, secret[:_LOOKUP_CHARS], _hash(key), environment, list(scopes),
    )  # fmt: skip
    return key_id, key


async def _lookup(conn: asyncpg.Connection, key: str) -> tuple[Principal, float] | None:
    """The key's Principal and the unix time it stops working (rotation grace end, expiry or revocation)."""
    parts = _split(key)
    if parts is None:
        return None
    environment, lookup = parts
    row = await conn.fetchrow(
        "SELECT id, tenant_id, environment, scopes, key_hash, expires_at, revoked_at FROM api_keys WHERE prefix = $1",
        lookup,
    )
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), _hash(key)):
        return None
    if row["environment"] != environment:
        return None
    ends = [t.timestamp() for t in (row["revoked_at"], row["expires_at"]) if t is not None]
    valid_until = min(ends, default=math.inf)
    if valid_until <= time.time():
        return None
    return Principal(row["id"], row["tenant_id"], row["environment"], frozenset(row["scopes"])), valid_until


async def verify_api_key(conn: asyncpg.Connection, key: str) -> Principal | None:
    found = await _lookup(conn, key)
    return None if found is None else found[0]


class Authenticator:
    """Resolves bearer keys, caching hits for a few seconds so the hot path is not a query per request.

    A cached key is dropped the moment its known end passes (a rotated key's grace period, an expiry), so
    only a revocation or rotation made *after* it was cached can go unseen, and only for `ttl_s`: that is
    the revocation latency in every other process. The process that revokes forgets the key at once.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = _CACHE_TTL_S, limiter: RateLimiter | None = None) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.limiter = limiter
        # digest -> (monotonic time the entry goes stale, unix time the key stops working, principal)
        self._cache: dict[bytes, tuple[float, float, Principal]] = {}

    async def principal(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer ft_live_…'")
        key = authorization[7:].strip()
        digest = _hash(key)
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > time.monotonic() and hit[1] > time.time():
            return hit[2]
        async with self.pool.acquire() as conn:
            found = await _lookup(conn, key)
        if found is None:
            self._cache.pop(digest, None)
            raise ApiError(401, "unauthorized", "invalid, expired or revoked API key")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic() + self.ttl_s, found[1], found[0])
        return found[0]

    def forget(self, key_id: str) -> None:
        """Drops a key revoked or rotated by this process, so here the change applies to the next request."""
        for digest in [d for d, (_, _, p) in self._cache.items() if p.key_id == key_id]:
            del self._cache[digest]


async def authenticate(request: Request) -> Principal:
    """The request's Principal (401 without a valid key), counted against the key's rate limit (429)."""
    cached: Principal | None = request.scope.get("state", {}).get("principal")
    if cached is not None:
        return cached
    authenticator: Authenticator = request.app.state.authenticator
    principal = await authenticator.principal(request.headers.get("authorization"))
    if authenticator.limiter is not None:
        await authenticator.limiter.enforce(request, principal.key_id)
    request.scope["state"]["principal"] = principal
    return principal


def require_scope(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """FastAPI dependency: the request's Principal, which must hold `scope` (or `admin`); counts the request
    against the key's rate limit first, so refused and forbidden requests use budget too.

    Every input check that does not depend on the route's own parameters comes after it, in one order for every
    route: 401, 429, 403, then 400 for bytes that must not reach PostgreSQL or Kafka (NUL, lone surrogates, huge
    numbers), then 422 for query parameters the route does not document."""

    async def dependency(request: Request) -> Principal:
        principal = await authenticate(request)
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise ApiError(403, "forbidden", f"this API key lacks the {scope!r} scope")
        raise_bad_input(request)
        check_query_names(request)
        return principal

    setattr(dependency, SCOPE_ATTRIBUTE, scope)  # the OpenAPI marks the route as needing a bearer key
    return dependency
