"""Small timing helpers: percentiles, polling until a condition holds, reading Prometheus text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def wait_until(check: Callable[[], Awaitable[bool]], *, within: float, interval: float, what: str,
                     on_timeout: Callable[[], str] | None = None) -> float:  # fmt: skip
    """Poll until `check()` is true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + within
    while True:
        seen = time.monotonic()
        if await check():
            return seen
        if seen > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"benchmark harness: {what} not done after {within:.0f}s\n{detail}")
        await asyncio.sleep(interval)


def prometheus_values(text: str) -> dict[str, float]:
    """Unlabelled (or first-labelled) sample values by metric name, e.g. `…_seconds_sum`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        try:
            out[name_part] = float(value)
        except ValueError:
            continue
    return out
