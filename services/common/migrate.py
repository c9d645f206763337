"""Applies the numbered SQL files in migrations/ once each, recording them in a version table."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

from services.common.db import _quote_ident

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
log = logging.getLogger(__name__)


def migration_files() -> list[tuple[int, Path]]:
    files = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        number, _, _ = path.stem.partition("_")
        files.append((int(number), path))
    return files


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Bring `schema` up to date; returns the versions applied now. Safe to run concurrently."""
    applied_now: list[int] = []
    q = _quote_ident(schema)
    async with conn.transaction():
        # One migrator at a time per schema, even across processes.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"flowtrail-migrate:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
        await conn.execute(f"SET LOCAL search_path TO {q}, public")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files():
            if version in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name)
            applied_now.append(version)
            log.info("applied migration %s to schema %s", path.name, schema)
    return applied_now
