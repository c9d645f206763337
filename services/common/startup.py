"""Starting without the dependencies: PostgreSQL reached (and migrated) in the background, retried until it answers,
with requests meanwhile answered 503 + Retry-After instead of crashing the process (docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.db import connect, create_pool, pool_problem
from services.common.http import error_response
from services.common.migrate import migrate

log = logging.getLogger(__name__)

# What a probe or a scrape may ask while the database is away.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# How long a start waits for PostgreSQL before serving without it; a connection attempt is bounded the same.
FIRST_TRY_S = 5.0


async def retry_forever(what: str, attempt: Callable[[], Awaitable[None]], *, first: float = 0.5,
                        cap: float = 2.0, failed: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """`attempt()` until it returns, waiting `first` s doubling to `cap` between tries; each failure is logged and
    handed to `failed` (what readiness reports). Never gives up: a dependency away at start comes back."""
    delay = first
    while True:
        try:
            await attempt()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            problem = f"waiting for {what}: {exc!r}"
            if failed is not None:
                failed(problem)
            log.warning("%s; retrying in %.1f s", problem, delay)
        await asyncio.sleep(delay)
        delay = min(cap, delay * 2)


class Database:
    """The service's pool, usable before PostgreSQL answers: it connects on demand, and the schema is migrated once
    PostgreSQL first answers (tried for `FIRST_TRY_S` inline at start, then in the background)."""

    def __init__(self, dsn: str, schema: str, **pool_options: Any) -> None:
        self.dsn = dsn
        self.schema = schema
        self.pool_options = pool_options
        self.pool: asyncpg.Pool | None = None
        self.migrated = asyncio.Event()
        self.problem = "not connected yet"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # min_size 0: the pool makes no connection when built, so it exists while PostgreSQL is away.
        self.pool = await create_pool(self.dsn, self.schema, min_size=0, timeout=FIRST_TRY_S, **self.pool_options)
        self._task = asyncio.create_task(retry_forever("PostgreSQL", self._migrate, failed=self._failed))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), FIRST_TRY_S)
        if not self.migrated.is_set():
            log.warning("serving without PostgreSQL for now (%s); it is retried in the background", self.problem)

    def _failed(self, problem: str) -> None:
        self.problem = problem

    async def _migrate(self) -> None:
        conn = await asyncio.wait_for(connect(self.dsn, self.schema), FIRST_TRY_S)
        try:
            await migrate(conn, self.schema)
        finally:
            await conn.close()
        self.migrated.set()
        log.info("PostgreSQL answers; schema %s is up to date", self.schema)

    async def check(self) -> str | None:
        """For /readyz: None when a query can run now, else why not."""
        if self.pool is None or not self.migrated.is_set():
            return self.problem
        return await pool_problem(self.pool)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pool is not None:
            await self.pool.close()


class UntilMigrated:
    """503 `database_unavailable` with Retry-After for every request but the probes until the service's database
    (`database()`, None before the lifespan built it) is migrated: before that, a route's tables may not exist."""

    def __init__(self, app: ASGIApp, database: Callable[[], Database | None]) -> None:
        self.app = app
        self.database = database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PROBES:
            database = self.database()
            if database is None or not database.migrated.is_set():
                problem = database.problem if database is not None else "starting"
                response = error_response(Request(scope), 503, "database_unavailable",
                                          f"PostgreSQL is unavailable ({problem}); nothing was changed: retry after a "
                                          "moment", {"Retry-After": "2"})  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
