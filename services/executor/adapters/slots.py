"""Shared admission: the slots of flows with a concurrency limit and of tenants with a quota, kept in PostgreSQL so
every executor counts the same runs (docs/architecture.md, Admission; the functions are in
services/common/migrations/0028_admission_slots.sql).

Only runs a limit applies to come here; every other run starts without a round trip. A call waits while PostgreSQL
is away (retried, counted in `flowtrail_executor_admission_errors_total`): a limit is never guessed.

The admission commits without waiting for its WAL flush (`synchronous_commit = off`): a flush per admission held the
tenant's lock 6 to 17 ms, capping a tenant with a quota at about 100 admissions a second. What that risks is the last
moment of commits when PostgreSQL crashes, so a restart of PostgreSQL (a new `pg_postmaster_start_time()` seen on a
new connection) makes the executor `repair` its partitions' rows from its live runs before its next admission.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from services.common.startup import Database
from services.executor import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FIRST_S = 0.2
RETRY_CAP_S = 2.0


@dataclass(frozen=True, slots=True)
class SlotAnswer:
    outcome: str  # granted | blocked | refused
    flow_active: int  # runs of the flow holding a slot (before this one)
    tenant_active: int  # runs of the tenant holding a slot
    queued_ahead: int  # BLOCKED runs of the flow that arrived before this one


@dataclass(frozen=True, slots=True)
class Holder:
    """A run of an owned partition as reconciliation sees it."""

    run_id: str
    tenant_id: str
    flow_id: str


class SharedSlots:
    def __init__(self, dsn: str, schema: str, repair: Callable[[], Awaitable[None]] | None = None) -> None:
        self.db = Database(dsn, schema, max_size=4, settings={"synchronous_commit": "off"},
                           on_connect=self._connected)  # fmt: skip
        self._starting: asyncio.Task[None] | None = None
        # Rewrites every owned partition's rows from the live runs (the engine's); run after PostgreSQL restarted.
        self.repair = repair
        self._postmaster: object = None
        self._stale = False
        self._repairing = asyncio.Lock()

    async def _connected(self, conn: asyncpg.Connection) -> None:
        started = await conn.fetchval("SELECT pg_postmaster_start_time()")
        if self._postmaster is not None and started != self._postmaster:
            log.warning("PostgreSQL restarted: the shared admission rows of owned partitions are written again")
            self._stale = True
        self._postmaster = started

    async def _repair(self) -> None:
        """Once per restart of PostgreSQL; every other call waits on the lock until it is done, so no admission or
        release of this executor interleaves with the rows being written again."""
        async with self._repairing:
            if self._stale:
                if self.repair is not None:
                    await self.repair()
                self._stale = False

    def start(self) -> None:
        """Connect and migrate in the background: an executor serves unlimited runs while PostgreSQL is away."""
        if self._starting is None:
            self._starting = asyncio.create_task(self.db.start(), name="admission-db")

    async def close(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        await self.db.close()

    async def _call(self, what: str, query: Callable[[asyncpg.Connection], Awaitable[T]], *,
                    repaired: bool = True) -> T:  # fmt: skip
        """`query` on a pooled connection, retried until PostgreSQL answers; after a restart of PostgreSQL, once the
        rows are repaired (`repaired=False`: the repair's own calls)."""
        delay = RETRY_FIRST_S
        while True:
            try:
                if self._starting is None:
                    self.start()
                await self.db.migrated.wait()
                assert self.db.pool is not None
                async with self.db.pool.acquire() as conn:
                    if not (self._stale and repaired):
                        return await query(conn)
                await self._repair()
                continue
            except asyncio.CancelledError:
                raise
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                metrics.ADMISSION_ERRORS.inc()
                log.warning("shared admission (%s) failed: %r; retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(RETRY_CAP_S, delay * 2)

    async def admit(self, run_id: str, tenant_id: str, flow_id: str, partition: int, *, flow_limit: int | None,
                    tenant_limit: int | None, waiting: bool) -> SlotAnswer:  # fmt: skip
        """Ask for a slot (`waiting`: the run is BLOCKED, in its flow's queue). Idempotent by run id."""

        async def query(conn: asyncpg.Connection) -> Any:
            return await conn.fetchrow("SELECT * FROM admit_run($1, $2, $3, $4, $5, $6, $7)", run_id, tenant_id,
                                       flow_id, partition, flow_limit, tenant_limit, waiting)  # fmt: skip

        row = await self._call("admit", query)
        answer = SlotAnswer(row["outcome"], row["flow_active"], row["tenant_active"], row["queued_ahead"])
        metrics.ADMISSIONS.labels(answer.outcome).inc()
        return answer

    async def release(self, run_id: str, tenant_id: str, flow_id: str) -> list[tuple[str, int]]:
        """The run holds no slot and waits no more; returns the BLOCKED runs of its flow (and their partitions) that
        may start now, in arrival order."""

        async def query(conn: asyncpg.Connection) -> Any:
            return await conn.fetch("SELECT * FROM release_run($1, $2, $3)", run_id, tenant_id, flow_id)

        return [(r["run_id"], r["partition"]) for r in await self._call("release", query)]

    async def reconcile(self, partition: int, holding: list[Holder], keep: list[str]) -> int:
        """Make a partition's rows agree with its runs after a replay: a slot for each run in `holding` (RUNNING or
        PAUSED, with a limit), and no row for a run of the partition not in `holding` or `keep` (its BLOCKED runs).
        Rows left by a crash between an end and its release go; returns how many. The caller asks nothing for the
        partition's runs until this returns, so no admission races with it."""
        kept = [h.run_id for h in holding] + keep

        async def query(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                slots = await conn.execute(
                    "DELETE FROM admission_slots WHERE partition = $1 AND NOT (run_id = ANY($2::text[]))",
                    partition, kept,
                )  # fmt: skip
                queued = await conn.execute(
                    "DELETE FROM admission_queue WHERE partition = $1 AND NOT (run_id = ANY($2::text[]))",
                    partition, kept,
                )  # fmt: skip
                if holding:
                    await conn.executemany(
                        "INSERT INTO admission_slots (run_id, tenant_id, flow_id, partition) VALUES ($1, $2, $3, $4)"
                        " ON CONFLICT (run_id) DO NOTHING",
                        [(h.run_id, h.tenant_id, h.flow_id, partition) for h in holding],
                    )
            return int(slots.split()[-1]) + int(queued.split()[-1])

        return await self._call("reconcile", query, repaired=False)

    async def stored_quotas(self) -> dict[str, int]:
        """Each tenant's quota of active runs as the operator API stored it (`tenants.max_active_runs`)."""

        async def query(conn: asyncpg.Connection) -> Any:
            return await conn.fetch("SELECT id, max_active_runs FROM tenants WHERE max_active_runs IS NOT NULL")

        return {r["id"]: r["max_active_runs"] for r in await self._call("quotas", query)}

    async def hold(self, holders: list[tuple[Holder, int]]) -> None:
        """Slots for runs already active when their tenant got a quota (with their partitions)."""

        async def query(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                "INSERT INTO admission_slots (run_id, tenant_id, flow_id, partition) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (run_id) DO NOTHING",
                [(h.run_id, h.tenant_id, h.flow_id, p) for h, p in holders],
            )

        await self._call("hold", query)

    async def may_start(self, partitions: Iterable[int]) -> list[str]:
        """The BLOCKED runs of these partitions that a free slot of their flow lets start now (a wake-up lost to a
        crash between a release and its command is found here)."""
        owned = sorted(partitions)
        if not owned:
            return []

        async def query(conn: asyncpg.Connection) -> Any:
            return await conn.fetch(
                """
                SELECT w.run_id FROM (
                    SELECT q.run_id, q.partition, q.flow_limit,
                           row_number() OVER (PARTITION BY q.tenant_id, q.flow_id ORDER BY q.arrival) AS pos,
                           (SELECT count(*) FROM admission_slots s
                             WHERE s.tenant_id = q.tenant_id AND s.flow_id = q.flow_id) AS active
                      FROM admission_queue q
                     WHERE (q.tenant_id, q.flow_id) IN (
                        SELECT tenant_id, flow_id FROM admission_queue WHERE partition = ANY($1::int[]))
                ) w
                WHERE w.partition = ANY($1::int[]) AND w.pos + w.active <= w.flow_limit
                """,
                owned,
            )

        return [r["run_id"] for r in await self._call("sweep", query)]
