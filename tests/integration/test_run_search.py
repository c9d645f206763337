"""`q` over what users see (issue 12, item 7): record errors and a failed step's upstream answer, on the real database.

runs.search_details is derived in SQL from run_events (migration 0024); here the projector's own apply_batch writes
it, the runs list's own statement searches it through the trigram index, the migration's backfill derives the same
text for rows projected before it, and a payload purge takes the upstream's body out of it.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from services.api.adapters.runs import RunFilter, Sort, list_runs
from services.common.migrate import MIGRATIONS_DIR
from services.projector import rebuild, retention
from services.projector.adapters.store import Positioned, apply_batch
from tests.integration.test_projector_batch_splits import TWO, _run, _searched

NEWEST = Sort.parse("-created_at")


async def _project(db: asyncpg.Connection) -> None:
    ok = _run("r_ok", *TWO)
    ok.complete(output={"a": 1})
    ok.complete(output={"b": 2})
    ledger = [e for run in [*_searched(), ok] for e in run.ledger]
    await apply_batch(db, "g", [Positioned("ledger", 0, i, e) for i, e in enumerate(ledger)], side_effects=False)


async def _q(db: asyncpg.Connection, q: str, tenant: str = "t1") -> list[str]:
    page = await list_runs(db, RunFilter(tenant, "PRODUCTION", q=q), 100, NEWEST)
    return sorted(r["id"] for r in page.rows)


async def test_q_finds_record_errors_and_upstream_bodies_through_the_index(db: asyncpg.Connection) -> None:
    await _project(db)
    one = ["r_records_then_401"]
    assert await _q(db, "please enter VALUE(s) for: email") == one  # a record error; the flood's are other ones
    assert await _q(db, "xq-90210") == one  # a record error's message, any case
    assert await _q(db, "o:errorCode: user_error") == ["r_records_flood", *one]  # in the destination's raw error
    assert await _q(db, "The access token expired") == one  # the upstream's 401 body
    assert await _q(db, "invalid_token") == one
    assert await _q(db, "answered 401 Unauthorized") == one  # the run's error message, as before
    assert await _q(db, "record 3 refused") == ["r_records_flood"]
    assert await _q(db, "r_ok") == ["r_ok"]  # the run id, as before
    assert await _q(db, "The access token expired", tenant="t2") == []  # another tenant's q sees none of t1's
    # The list's condition can use runs_search_idx: its expression is the index's to the character.
    clauses, args = RunFilter("t1", "PRODUCTION", q="access token").where()
    (condition,) = [c for c in clauses if "ILIKE" in c]
    await db.execute("SET enable_seqscan = off")
    try:
        sql = f"EXPLAIN SELECT id FROM runs WHERE {condition.replace(f'${len(args)}', '$1')}"
        plan = [r[0] for r in await db.fetch(sql, args[-1])]
    finally:
        await db.execute("RESET enable_seqscan")
    assert "runs_search_idx" in "\n".join(plan), plan


async def _checksums(db: asyncpg.Connection) -> dict[str, Any]:
    return await rebuild.checksums(db, await db.fetchval("SELECT current_schema()"))


async def test_the_migration_backfills_what_the_projector_derives(db: asyncpg.Connection) -> None:
    await _project(db)
    projected = await _checksums(db)
    assert await db.fetchval("SELECT count(*) FROM runs WHERE search_details IS NOT NULL") == 2
    # Rows projected before the upgrade: no search text; the migration derives it from their run_events.
    await db.execute("UPDATE runs SET search_details = NULL")
    assert (await _checksums(db))["runs"] != projected["runs"]
    await db.execute((MIGRATIONS_DIR / "0024_run_search.sql").read_text())
    assert await _checksums(db) == projected


async def test_a_payload_purge_takes_the_upstream_body_out_of_the_search_text(db: asyncpg.Connection) -> None:
    await _project(db)
    assert await _q(db, "The access token expired") == ["r_records_then_401"]
    async with db.transaction():
        await retention._blank(db, ["r_records_then_401"])
    # The body was a step output, blanked with the payloads; the record errors are kept, so are their texts.
    assert await _q(db, "The access token expired") == []
    assert await _q(db, "Please enter value(s) for: Email") == ["r_records_then_401"]
