"""Migrations on the real database: each applied once with its file's checksum; an applied migration whose file
changed afterwards stops start-up with a message naming it, instead of leaving schemas that silently differ."""

from __future__ import annotations

import asyncpg
import pytest

from services.common.migrate import MigrationChanged, checksum, migrate, migration_files
from tests.conftest import Sandbox


async def test_each_migration_is_recorded_with_its_checksum_and_applied_once(
    sandbox: Sandbox, db: asyncpg.Connection
) -> None:
    rows = {r["version"]: r for r in await db.fetch("SELECT version, name, checksum FROM schema_migrations")}
    files = migration_files()
    assert sorted(rows) == [v for v, _ in files]
    for version, path in files:
        assert rows[version]["name"] == path.name and rows[version]["checksum"] == checksum(path)
    assert await migrate(db, sandbox.schema) == []  # nothing applied twice


async def test_a_changed_applied_migration_stops_start_up_naming_it(sandbox: Sandbox, db: asyncpg.Connection) -> None:
    version, path = migration_files()[3]
    # As if the file had been edited after this schema ran it: the recorded checksum no longer matches.
    await db.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1", version, "0" * 64)
    with pytest.raises(MigrationChanged, match=path.name) as refused:
        await migrate(db, sandbox.schema)
    assert "new migration" in str(refused.value)
    # A row from before checksums were recorded takes the file's checksum, once.
    await db.execute("UPDATE schema_migrations SET checksum = NULL WHERE version = $1", version)
    assert await migrate(db, sandbox.schema) == []
    assert await db.fetchval("SELECT checksum FROM schema_migrations WHERE version = $1", version) == checksum(path)
