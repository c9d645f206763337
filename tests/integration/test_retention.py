"""Retention: runs past their tenant's period disappear, payloads past theirs are blanked, the ledger keeps all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import append_ledger, assert_verify_equal, connected, records_in, running, wait_projected, wait_sql

NOW = datetime.now(UTC)


async def test_purge_deletes_old_runs_blanks_old_payloads_and_keeps_the_ledger(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    purging = {"FLOWTRAIL_PROJECTOR_RETENTION_INTERVAL_S": "0.2"}
    async with (
        running(infra, tmp_path_factory, keys={"a": "t1"}, services=("projector", "api"), env=purging) as env,
        connected(env) as db,
    ):
        await db.execute("UPDATE tenants SET retention_days = 30, payload_retention_days = 7 WHERE id = 't1'")
        ancient = run_events("run_ancient", start=NOW - timedelta(days=45))
        old = run_events("run_old", start=NOW - timedelta(days=10))
        fresh = run_events("run_fresh", start=NOW - timedelta(hours=1))
        # Unfinished and ancient: retention never removes a run that is still going.
        stuck = run_events("run_stuck", start=NOW - timedelta(days=60))[:5]
        everything = ancient + old + fresh + stuck
        await append_ledger(env.sandbox, everything)
        # Projected, then purged by a later pass of the retention loop.
        await wait_projected(env, len(everything))
        await wait_sql(db, "SELECT count(*) = 3 AND bool_or(id = 'run_old' AND payloads_purged) FROM runs",
                       what="run_ancient deleted and run_old's payloads blanked", logs=env.log_tails)  # fmt: skip

        async with env.client() as api:
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
        await append_ledger(env.sandbox, ancient)
        await wait_projected(env, len(everything) + len(ancient))
        assert await db.fetchval("SELECT count(*) FROM runs WHERE id = 'run_ancient'") == 0
        assert await db.fetchval("SELECT count(*) FROM run_events WHERE run_id = 'run_ancient'") == 0

        # The ledger still holds every event, and a verify replays it to the same purged state.
        assert await records_in(env.infra.kafka_bootstrap, env.sandbox.topics.ledger) == len(everything) + len(ancient)
        await assert_verify_equal(env.sandbox)
