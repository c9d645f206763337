"""The session's broker and database are real and reachable."""

import asyncpg

from tests.conftest import Sandbox


async def test_schema_is_migrated(sandbox: Sandbox, db: asyncpg.Connection) -> None:
    tables = {
        r["table_name"]
        for r in await db.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", sandbox.schema
        )
    }
    assert {"runs", "run_steps", "run_events", "projector_offsets", "api_keys"} <= tables
