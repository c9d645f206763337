"""Rate-limit blocks on the real PostgreSQL (docs/api-contract.md#rate-limits): two limiters over two pools — two
processes — hammering one key admit exactly its limit between them, never more, while each admits most requests
from blocks it reserved without a round trip; an idle block's unused slots go back within its lease, so the other
process gets them; a key used one request at a time is counted one upsert each, as before blocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.common.db import create_pool, keep_session
from services.common.ratelimit import BLOCK_LEASE_S, LENT_GRACE_S, Decision, Limits, RateLimiter
from tests.conftest import Sandbox

LIMIT = 400  # a block is at most LIMIT // 32 = 12 slots
LIMITS = Limits(triggers=LIMIT, window_s=3600)  # one window for the whole test: every admission counts against it


class CountingPool:
    """A pool that counts the statements sent through it: the round trips the limiter pays."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.statements = 0

    async def fetchrow(self, *args: Any) -> Any:
        self.statements += 1
        return await self.pool.fetchrow(*args)

    async def fetchmany(self, sql: str, args: list[Any]) -> Any:
        self.statements += len(args)
        return await self.pool.fetchmany(sql, args)

    async def execute(self, *args: Any) -> Any:
        self.statements += 1
        return await self.pool.execute(*args)


@pytest.fixture
async def pools(sandbox: Sandbox) -> AsyncIterator[tuple[CountingPool, CountingPool]]:
    one, two = [await create_pool(sandbox.infra.database_url, sandbox.schema, reset=keep_session) for _ in range(2)]
    try:
        yield CountingPool(one), CountingPool(two)
    finally:
        await one.close()
        await two.close()


def limiter(pool: CountingPool) -> RateLimiter:
    return RateLimiter(pool, LIMITS)  # type: ignore[arg-type]


async def window_count(pool: CountingPool, key: str) -> tuple[int, int]:
    row = await pool.pool.fetchrow("SELECT current, lent FROM rate_limit_windows WHERE key_id = $1", key)
    return row["current"], row["lent"]


async def test_two_processes_hammering_one_key_admit_exactly_the_limit(
    pools: tuple[CountingPool, CountingPool],
) -> None:
    one, two = limiter(pools[0]), limiter(pools[1])
    decisions: dict[int, list[Decision]] = {0: [], 1: []}

    async def hammer(which: int, lim: RateLimiter, calls: int) -> None:
        for _ in range(calls):
            decisions[which].append(await lim.hit("k1", "triggers"))

    # 16 workers per process, 600 calls per process: 1,200 asks for 400 slots, both processes asking throughout.
    await asyncio.gather(*(hammer(i % 2, (one, two)[i % 2], 600 // 16) for i in range(32)))
    admitted = [d for ds in decisions.values() for d in ds if d.admitted]
    assert len(admitted) == LIMIT, (len(admitted), {w: sum(d.admitted for d in ds) for w, ds in decisions.items()})
    assert all(d.remaining >= 0 for ds in decisions.values() for d in ds)
    assert all(d.retry_after_s >= 1 and d.remaining == 0 for ds in decisions.values() for d in ds if not d.admitted)
    # Both processes got a share, and blocks saved round trips: far fewer statements than admitted requests.
    assert all(sum(d.admitted for d in ds) > 0 for ds in decisions.values())
    statements = pools[0].statements + pools[1].statements
    assert statements < len(admitted) / 2, statements
    await asyncio.sleep(BLOCK_LEASE_S + LENT_GRACE_S)  # every block's lease has ended and its slots are settled
    assert await window_count(pools[0], "k1") == (LIMIT, 0)


async def test_an_idle_blocks_unused_slots_go_back_to_the_other_process(
    pools: tuple[CountingPool, CountingPool],
) -> None:
    one, two = limiter(pools[0]), limiter(pools[1])
    # A burst in one process marks the key busy; its next requests reserve a block (12 slots) and admit from it
    # without a round trip; then it stops asking, with slots unused.
    burst = await asyncio.gather(*(one.hit("k2", "triggers") for _ in range(40)))
    statements = pools[0].statements
    after = [await one.hit("k2", "triggers") for _ in range(6)]
    assert all(d.admitted for d in burst + after) and pools[0].statements == statements + 1
    assert [d.remaining for d in after] == list(range(LIMIT - 41, LIMIT - 47, -1))
    assert await window_count(pools[0], "k2") == (52, 11)  # 46 admitted, 6 of the block's 11 lent slots unused
    started = time.monotonic()
    while (await window_count(pools[0], "k2"))[1] > 0:
        assert time.monotonic() - started < BLOCK_LEASE_S + LENT_GRACE_S + 1, "lent slots never came back"
        await asyncio.sleep(0.02)
    assert await window_count(pools[0], "k2") == (46, 0)
    # The other process gets every slot left, one request at a time, and no more.
    rest = [await two.hit("k2", "triggers") for _ in range(LIMIT - 46 + 3)]
    assert [d.admitted for d in rest] == [True] * (LIMIT - 46) + [False] * 3
    assert [d.remaining for d in rest[: LIMIT - 46]] == list(range(LIMIT - 47, -1, -1))


async def test_one_request_at_a_time_is_one_upsert_each_and_reserves_nothing(
    pools: tuple[CountingPool, CountingPool],
) -> None:
    one, two = limiter(pools[0]), limiter(pools[1])
    seen = [await (one, two)[i % 2].hit("k3", "triggers") for i in range(10)]
    assert [d.remaining for d in seen] == list(range(LIMIT - 1, LIMIT - 11, -1))
    assert pools[0].statements + pools[1].statements == 10
    assert await window_count(pools[0], "k3") == (10, 0)
