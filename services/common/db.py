"""PostgreSQL pool for every service: one schema per deployment (or per test), JSONB as Python values."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A string as an SQL literal, for the few statements sent as text with their values (several statements in one
    round trip take no parameters). Safe because every connection has standard_conforming_strings on (below)."""
    return "'" + value.replace("'", "''") + "'"


def _server_settings(schema: str) -> dict[str, str]:
    # Startup parameters, not SETs: the pool's RESET ALL on release would undo a SET.
    return {"search_path": f"{_quote_ident(schema)}, public", "standard_conforming_strings": "on"}


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )
    # A text-format codec's encoder returns str.
    await conn.set_type_codec(
        "json", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog", format="text"
    )


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pool `reset` for code that leaves no session state behind (no SET, session advisory lock, LISTEN or
    WITH HOLD cursor): asyncpg still rolls back an open transaction, and skips its reset query, a round trip
    on every release."""


async def create_pool(
    dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10,
    reset: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    settings: dict[str, str] | None = None,
    on_connect: Callable[[asyncpg.Connection], Awaitable[None]] | None = None, **connect_options: Any,
) -> asyncpg.Pool:  # fmt: skip
    """`settings`: more server settings for each connection (e.g. `synchronous_commit`); `on_connect`: called with
    each new connection after the codecs are set; `connect_options` go to each connection (e.g. `timeout`, how long a
    connection attempt may take)."""

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        if on_connect is not None:
            await on_connect(conn)

    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init,
        server_settings={**_server_settings(schema), **(settings or {})}, reset=reset, **connect_options,
    )  # fmt: skip
    assert pool is not None
    return pool


async def connect(dsn: str, schema: str) -> asyncpg.Connection:
    conn: Any = await asyncpg.connect(dsn, server_settings=_server_settings(schema))
    await _init_connection(conn)
    return conn


async def pool_problem(pool: asyncpg.Pool, timeout_s: float = 2.0) -> str | None:
    """For /readyz: None when the pool can run a query now, else why not."""
    try:
        async with asyncio.timeout(timeout_s):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        return f"PostgreSQL unreachable: {exc!r}"
    return None
