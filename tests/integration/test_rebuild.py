"""`flowtrail projector verify | rebuild` on the real broker and database, with a projector running."""

from __future__ import annotations

import asyncio

import pytest

from services.executor.adapters.slots import SharedSlots
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, Sandbox
from tests.factories import run_events
from tests.harness import append_ledger, connected, projector_settings, running, wait_projected


def _settings(sandbox: Sandbox) -> ProjectorSettings:
    return projector_settings(sandbox).model_copy(update={"batch_max_records": 300})


async def test_verify_finds_tampered_runs_and_rebuild_repairs_them_while_projecting(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with running(infra, tmp_path_factory, services=("projector",)) as env, connected(env) as db:
        sandbox = env.sandbox
        first = [e for i in range(300) for e in run_events(f"run_a{i:04d}", fail_at=1 if i % 7 == 0 else None)]
        await append_ledger(sandbox, first)
        lines: list[str] = []
        try:
            await wait_projected(env, len(first), within=60)

            clean = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
            assert clean.comparison.equal, clean.comparison.tables
            assert clean.events == len(first)
            assert any("events/s" in line and "ETA" in line for line in lines)
            # verify leaves no shadow schema behind.
            assert (
                await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", f"{sandbox.schema}__rebuild")
                == 0
            )

            # Tamper with the read models the way a buggy projector would.
            await db.execute("UPDATE runs SET status = 'SUCCEEDED' WHERE id = 'run_a0007'")
            await db.execute("DELETE FROM run_steps WHERE run_id = 'run_a0010' AND step = 'step1'")
            tampered = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
            assert set(tampered.comparison.differing_tables) == {"runs", "run_steps"}
            assert tampered.comparison.differing_runs == ["run_a0007", "run_a0010"]
            # Key by key, with the columns that differ and both values, or the side a row is missing from.
            (status,) = tampered.comparison.rows["runs"].first
            assert (status.key, status.columns) == ({"run_id": "run_a0007"}, ("status",))
            assert (status.live, status.rebuilt) == ({"status": "SUCCEEDED"}, {"status": "FAILED"})
            (step,) = tampered.comparison.rows["run_steps"].first
            assert (step.key, step.only_in, tampered.comparison.rows["run_steps"].rows) == (
                {"run_id": "run_a0010", "step": "step1"}, "rebuilt", 1,
            )  # fmt: skip
            report = rebuild.describe(tampered.comparison)
            assert 'run_id=run_a0007: status live="SUCCEEDED" rebuilt="FAILED"' in report
            assert "run_id=run_a0010 step=step1: missing from the live tables" in report
            # The keys listed are capped; the count is not.
            await db.execute(
                "UPDATE step_attempts SET duration_ms = 7 WHERE run_id BETWEEN 'run_a0001' AND 'run_a0004'"
            )
            capped = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append, show=3)
            attempts = capped.comparison.rows["step_attempts"]
            assert attempts.rows == 4 * 3 and len(attempts.first) == 3
            assert [d.key for d in attempts.first] == [
                {"run_id": "run_a0001", "step": f"step{i}", "attempt": "1"} for i in range(3)
            ]
            assert {d.columns for d in attempts.first} == {("duration_ms",)}
            assert "step_attempts: 12 row(s) differ (first 3 in key order)" in rebuild.describe(capped.comparison)

            # An executor holds a slot of a limited flow in the shared admission (coordination state, not derived).
            slots = SharedSlots(sandbox.infra.database_url, sandbox.schema)
            held = await slots.admit("held", "t1", "f", 0, flow_limit=1, tenant_limit=None, waiting=False)
            assert held.outcome == "granted"

            # Rebuild while new runs keep arriving; the running projector must follow the swap.
            second = [e for i in range(300) for e in run_events(f"run_b{i:04d}")]
            producing = asyncio.create_task(append_ledger(sandbox, second))
            swapped = await rebuild.run(_settings(sandbox), swap=True, progress=lines.append)
            await producing
            assert swapped.swapped_to is not None
            assert set(swapped.comparison.differing_tables) == {
                "runs",
                "run_steps",
                "step_attempts",
            }  # what it repaired

            await wait_projected(env, len(first) + len(second), within=60)
            # db's search_path names the schema, so it now reads the rebuilt one.
            assert await db.fetchval("SELECT status FROM runs WHERE id = 'run_a0007'") == "FAILED"
            assert await db.fetchval("SELECT count(*) FROM run_steps WHERE run_id = 'run_a0010'") == 3
            assert await db.fetchval("SELECT count(*) FROM run_events") == len(first) + len(second)
            assert await db.fetchval("SELECT count(*) FROM runs") == 600
            # The slot held before the swap still counts after it, for the executor's connections made before it.
            late = await slots.admit("late", "t1", "f", 0, flow_limit=1, tenant_limit=None, waiting=False)
            assert (late.outcome, late.flow_active) == ("blocked", 1)
            assert await db.fetchval("SELECT count(*) FROM admission_slots") == 1
            assert await db.fetchval("SELECT run_id FROM admission_queue") == "late"
            await slots.close()
            # The old schema is kept for inspection.
            assert await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", swapped.swapped_to) == 1

            # verify while the projector keeps projecting: the live rows are read as of the snapshot its offsets
            # came from, so runs that change during the replay do not show as differences.
            third = [e for i in range(300) for e in run_events(f"run_c{i:04d}", fail_at=0 if i % 5 == 0 else None)]
            producing = asyncio.create_task(append_ledger(sandbox, third))
            after = await rebuild.run(_settings(sandbox), swap=False, progress=lines.append)
            await producing
            assert after.comparison.equal, rebuild.describe(after.comparison)
        finally:
            if "swapped" in locals() and swapped.swapped_to:
                await db.execute(f'DROP SCHEMA IF EXISTS "{swapped.swapped_to}" CASCADE')


async def test_verify_and_rebuild_refuse_at_once_when_the_log_ends_before_what_the_read_models_projected(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A ledger truncated or replaced under the read models (the broker's data lost, or the bootstrap naming another
    cluster) cannot be replayed up to the offsets they record: both jobs say so and stop, instead of waiting forever."""
    async with running(infra, tmp_path_factory, services=("projector",)) as env, connected(env) as db:
        events = [e for i in range(20) for e in run_events(f"run_t{i:03d}")]
        await append_ledger(env.sandbox, events)
        await wait_projected(env, len(events), within=60)
        ledger = env.sandbox.topics.ledger
        recorded = await db.fetchval(
            "UPDATE projector_offsets SET next_offset = next_offset + 20 WHERE topic = $1 AND partition = 0 "
            "RETURNING next_offset", ledger,
        )  # fmt: skip
        for swap in (False, True):
            with pytest.raises(rebuild.LogBehindReadModels) as refused:
                await asyncio.wait_for(rebuild.run(_settings(env.sandbox), swap=swap, progress=lambda _: None), 60)
            message = str(refused.value)
            assert f"{ledger}[0] recorded up to offset {recorded:,}, the log ends at {recorded - 20:,}" in message
            assert "truncated or replaced" in message
        # Nothing was swapped in: the live read models are still there, whole.
        assert await db.fetchval("SELECT count(*) FROM runs WHERE id LIKE 'run_t%'") == 20
