"""Retention: runs past their tenant's period disappear, payloads past theirs are blanked, the ledger keeps all."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.auth import create_api_key, ensure_tenant
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Sandbox
from tests.e2e.stack import Stack
from tests.factories import produce, run_events

NOW = datetime.now(UTC)


async def _ledger_size(sandbox: Sandbox) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=sandbox.infra.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        parts = [TopicPartition(sandbox.topics.ledger, p) for p in range(sandbox.partitions)]
        ends = await consumer.end_offsets(parts)
        starts = await consumer.beginning_offsets(parts)
        return sum(ends[p] - starts[p] for p in parts)
    finally:
        await consumer.stop()


async def test_purge_deletes_old_runs_blanks_old_payloads_and_keeps_the_ledger(
    sandbox: Sandbox, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await ensure_tenant(db, "t1", "T1")
    await db.execute("UPDATE tenants SET retention_days = 30, payload_retention_days = 7 WHERE id = 't1'")
    _, key = await create_api_key(db, "t1")
    ancient = run_events("run_ancient", start=NOW - timedelta(days=45))
    old = run_events("run_old", start=NOW - timedelta(days=10))
    fresh = run_events("run_fresh", start=NOW - timedelta(hours=1))
    # Unfinished and ancient: retention never removes a run that is still going.
    stuck = run_events("run_stuck", start=NOW - timedelta(days=60))[:5]
    everything = ancient + old + fresh + stuck
    await produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, everything, sandbox.partitions)

    stack = Stack.build(sandbox, ("projector", "api"), tmp_path, FLOWTRAIL_PROJECTOR_RETENTION_INTERVAL_S="0.2")
    await stack.start()
    try:
        deadline = time.monotonic() + 30
        # Projected, then purged by a later pass of the retention loop.
        while not await db.fetchval(
            "SELECT count(*) = 3 AND bool_or(id = 'run_old' AND payloads_purged) FROM runs"
        ) or await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets") < len(everything):
            assert time.monotonic() < deadline, stack["projector"].log_tail()
            await asyncio.sleep(0.05)

        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=stack["api"].url, headers=headers, timeout=10) as api:
            assert (await api.get("/v1/runs/run_ancient")).status_code == 404
            listed = {r["id"] for r in (await api.get("/v1/runs", params={"limit": 100})).json()["data"]}
            assert listed == {"run_old", "run_fresh", "run_stuck"}

            old_run = (await api.get("/v1/runs/run_old")).json()
            assert old_run["status"] == "SUCCEEDED"  # the metadata stays
            assert old_run["trigger"]["payload"] is None
            assert all(s["input"] is None and s["output"] is None for s in old_run["steps"])
            old_events = (await api.get("/v1/runs/run_old/events")).json()["data"]
            assert len(old_events) == len(old)  # the run's timeline keeps every event, minus the bodies
            assert all("input" not in e["payload"] and "output" not in e["payload"] for e in old_events)

            fresh_run = (await api.get("/v1/runs/run_fresh")).json()
            assert fresh_run["trigger"]["payload"] == {"n": "run_fresh"}
            assert fresh_run["steps"][0]["output"] == {"i": 0, "ok": True}
            stuck_run = (await api.get("/v1/runs/run_stuck")).json()
            assert stuck_run["trigger"]["payload"] == {"n": "run_stuck"}

        # A late redelivery of a purged run's events does not bring it back.
        await produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, ancient, sandbox.partitions)
        deadline = time.monotonic() + 30
        while await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets") < len(everything) + len(
            ancient
        ):
            assert time.monotonic() < deadline, stack["projector"].log_tail()
            await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT count(*) FROM runs WHERE id = 'run_ancient'") == 0
        assert await db.fetchval("SELECT count(*) FROM run_events WHERE run_id = 'run_ancient'") == 0

        # The ledger still holds every event, and a verify replays it to the same purged state.
        assert await _ledger_size(sandbox) == len(everything) + len(ancient)
        settings = ProjectorSettings(
            kafka_bootstrap=sandbox.infra.kafka_bootstrap, database_url=sandbox.infra.database_url,
            database_schema=sandbox.schema, topic_prefix=sandbox.topics.prefix,
        )  # fmt: skip
        outcome = await rebuild.run(settings, swap=False, progress=lambda _: None)
        assert outcome.comparison.equal, outcome.comparison.differing_tables
    finally:
        stack.stop()
