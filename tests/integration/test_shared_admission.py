"""The shared admission on the real PostgreSQL (services/executor/adapters/slots.py and the functions of migration
0028): two executors' admissions at once never exceed a flow's limit or a tenant's quota, BLOCKED runs start in
arrival order, a release names exactly the runs a freed slot lets start, and reconciliation after a crash removes
the rows of runs that ended without their release."""

from __future__ import annotations

import asyncio

import asyncpg

from services.executor.adapters.slots import Holder, SharedSlots
from tests.conftest import Sandbox


def _slots(sandbox: Sandbox) -> SharedSlots:
    return SharedSlots(sandbox.infra.database_url, sandbox.schema)


async def test_concurrent_admissions_from_two_executors_never_exceed_the_flow_limit_or_the_tenant_quota(
    sandbox: Sandbox,
) -> None:
    one, two = _slots(sandbox), _slots(sandbox)  # two executors' pools
    try:
        asks = [
            (one if i % 2 else two).admit(f"run-{i}", "t1", "orders", i % 4, flow_limit=3, tenant_limit=None,
                                          waiting=False)
            for i in range(40)
        ]  # fmt: skip
        answers = await asyncio.gather(*asks)
        assert sorted(a.outcome for a in answers).count("granted") == 3
        assert [a.outcome for a in answers].count("blocked") == 37

        quota = [
            (one if i % 2 else two).admit(f"q-{i}", "t2", f"flow-{i % 5}", i % 4, flow_limit=None, tenant_limit=4,
                                          waiting=False)
            for i in range(30)
        ]  # fmt: skip
        outcomes = [a.outcome for a in await asyncio.gather(*quota)]
        assert outcomes.count("granted") == 4 and outcomes.count("refused") == 26
    finally:
        await one.close()
        await two.close()


async def test_blocked_runs_start_in_arrival_order_and_a_release_wakes_as_many_as_slots_are_free(
    sandbox: Sandbox,
) -> None:
    slots = _slots(sandbox)
    try:
        for run in ("a", "b"):
            assert (await slots.admit(run, "t1", "f", 0, flow_limit=2, tenant_limit=None, waiting=False)).outcome == (
                "granted"
            )
        blocked = [await slots.admit(r, "t1", "f", i % 3, flow_limit=2, tenant_limit=None, waiting=False)
                   for i, r in enumerate(("c", "d", "e"))]  # fmt: skip
        assert [(b.outcome, b.flow_active, b.queued_ahead) for b in blocked] == [
            ("blocked", 2, 0), ("blocked", 2, 1), ("blocked", 2, 2)
        ]  # fmt: skip

        # A newcomer with a free slot still waits behind earlier arrivals.
        assert await slots.release("a", "t1", "f") == [("c", 0)]
        late = await slots.admit("z", "t1", "f", 1, flow_limit=2, tenant_limit=None, waiting=False)
        assert (late.outcome, late.queued_ahead) == ("blocked", 3)
        # A run not at the head asking early stays waiting; the head takes the slot.
        assert (await slots.admit("d", "t1", "f", 1, flow_limit=2, tenant_limit=None, waiting=True)).outcome == (
            "blocked"
        )
        assert (await slots.admit("c", "t1", "f", 0, flow_limit=2, tenant_limit=None, waiting=True)).outcome == (
            "granted"
        )
        assert (await slots.admit("c", "t1", "f", 0, flow_limit=2, tenant_limit=None, waiting=True)).outcome == (
            "granted"
        )  # asked again after a crash: the same slot, not a second one
        # Two slots freed at once: the next two in arrival order may start.
        await slots.release("b", "t1", "f")
        assert await slots.release("c", "t1", "f") == [("d", 1), ("e", 2)]
        assert await slots.may_start([1]) == ["d"] and await slots.may_start([2]) == ["e"]
        assert await slots.release("never-admitted", "t1", "f") == []
    finally:
        await slots.close()


async def test_a_blocked_run_meets_the_tenant_quota_only_once_its_flow_has_room(sandbox: Sandbox) -> None:
    slots = _slots(sandbox)
    try:
        assert (await slots.admit("a", "t1", "f", 0, flow_limit=1, tenant_limit=2, waiting=False)).outcome == "granted"
        assert (await slots.admit("b", "t1", "g", 0, flow_limit=None, tenant_limit=2, waiting=False)).outcome == (
            "granted"
        )
        assert (await slots.admit("c", "t1", "f", 0, flow_limit=1, tenant_limit=2, waiting=False)).outcome == (
            "refused"
        )  # a newcomer meets the quota first, as decide checks it
        # A BLOCKED run (its row gone, e.g. PostgreSQL restored) queues again and waits while the flow is full.
        assert (await slots.admit("d", "t1", "f", 0, flow_limit=1, tenant_limit=2, waiting=True)).outcome == "blocked"
        await slots.release("a", "t1", "f")
        assert (await slots.admit("d", "t1", "f", 0, flow_limit=1, tenant_limit=2, waiting=True)).outcome == "granted"
    finally:
        await slots.close()


async def test_reconciliation_removes_rows_of_runs_that_ended_without_their_release_and_restores_held_slots(
    sandbox: Sandbox, db: asyncpg.Connection
) -> None:
    slots = _slots(sandbox)
    try:
        for run, partition in (("ended", 0), ("running", 0), ("other-partition", 1)):
            await slots.admit(run, "t1", "f", partition, flow_limit=3, tenant_limit=None, waiting=False)
        await slots.admit("gone-blocked", "t1", "f", 0, flow_limit=3, tenant_limit=None, waiting=False)
        await slots.admit("still-blocked", "t1", "f", 0, flow_limit=3, tenant_limit=None, waiting=False)

        # Partition 0 replayed: `running` and `paused` (whose row was lost) hold slots, `still-blocked` waits.
        removed = await slots.reconcile(0, [Holder("running", "t1", "f"), Holder("paused", "t1", "f")],
                                        ["still-blocked"])  # fmt: skip
        assert removed == 2  # `ended`'s slot and `gone-blocked`'s place in the queue
        held = {r["run_id"] for r in await db.fetch("SELECT run_id FROM admission_slots")}
        queued = {r["run_id"] for r in await db.fetch("SELECT run_id FROM admission_queue")}
        assert held == {"running", "paused", "other-partition"} and queued == {"still-blocked"}
    finally:
        await slots.close()


async def test_after_postgresql_restarts_the_rows_it_may_have_lost_are_written_again_before_the_next_admission(
    sandbox: Sandbox, db: asyncpg.Connection
) -> None:
    """Admissions commit without waiting for the WAL flush, so a crash of PostgreSQL may lose the last ones: a new
    postmaster seen on a new connection makes the executor write its rows again before it admits anything."""
    repairs: list[str] = []

    async def repair() -> None:  # what the engine does: its live runs' rows, written again
        repairs.append("repaired")
        await slots.reconcile(0, [Holder("running", "t1", "f")], [])

    slots = SharedSlots(sandbox.infra.database_url, sandbox.schema, repair=repair)
    try:
        assert (await slots.admit("running", "t1", "f", 0, flow_limit=1, tenant_limit=None, waiting=False)).outcome == (
            "granted"
        )
        await db.execute("DELETE FROM admission_slots")  # the commit a crash lost
        assert slots.db.pool is not None
        slots._postmaster = "an earlier postmaster"  # as if PostgreSQL restarted since the last connection
        await slots.db.pool.expire_connections()
        late = await slots.admit("newcomer", "t1", "f", 0, flow_limit=1, tenant_limit=None, waiting=False)
        assert late.outcome == "blocked" and repairs == ["repaired"]  # without the repair it would be granted
        assert (await slots.admit("other", "t1", "f", 0, flow_limit=1, tenant_limit=None, waiting=False)).outcome == (
            "blocked"
        ) and repairs == ["repaired"]  # once
    finally:
        await slots.close()
