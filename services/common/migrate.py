"""Applies the numbered SQL files in migrations/ once each, recording them in a version table."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import asyncpg

from services.common.db import _quote_ident

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
log = logging.getLogger(__name__)


class MigrationChanged(Exception):
    """A migration applied to this schema differs from its file now: edit history by adding a migration instead."""


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        # Each applied file's SHA-256: a shipped migration edited afterwards would leave deployments that ran the old
        # text and ones that ran the new one with different schemas, silently. Rows from before checksums were kept
        # take the file's current checksum once.
        await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
        done = {
            r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for version, path in migration_files():
            if version in done:
                recorded = done[version]
                if recorded is None:
                    await conn.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1", version,
                                       checksum(path))  # fmt: skip
                elif recorded != checksum(path):
                    raise MigrationChanged(
                        f"migration {path.name} was applied to schema {schema!r} with other contents (sha256 "
                        f"{recorded[:12]}…, the file is now {checksum(path)[:12]}…): an applied migration must not "
                        "change — undo the edit and put the change in a new migration"
                    )
                continue
            await conn.execute(path.read_text())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                version, path.name, checksum(path),
            )  # fmt: skip
            applied_now.append(version)
            log.info("applied migration %s to schema %s", path.name, schema)
    return applied_now
