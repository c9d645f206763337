"""The web console's runs page at a million runs (FLOWTRAIL_BENCH_SCALE=default; smoke: 5,000), and a 50-step run's
detail: how long from opening the page until the runs (the steps) are on screen, in headless Chromium
(tests/browser.py), against the API's own list call.

Rows go straight into the read models with COPY; one API process serves the page and the API. The page is opened
signed in (the key in session storage, as after the sign-in form), and "usable" is the moment its first page of
runs is rendered: the HTML, the console's modules and packages, the list call and the render, as the page marks it
(`performance.mark`, from navigation start). The raw baseline is the list call the page makes, timed from a plain
HTTP client; the ratio is what the page adds on top of it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from services.common.db import connect
from tests.bench.loaders import STEP_COLUMNS, bench_sandbox, copy_rows, seed_runs
from tests.bench.measure import percentile
from tests.bench.report import Report, Target
from tests.bench.scale import Scale
from tests.browser import headless_chromium, signed_in
from tests.conftest import Infra
from tests.e2e.stack import Stack

SAMPLES = 15  # page loads timed (after two to warm the caches up)
USABLE_MS = 300
STEPS = 50


async def test_runs_page_is_usable_quickly_at_scale(infra: Infra, scale: Scale, report: Report, log_dir: Path) -> None:
    n = scale.query_runs
    async with bench_sandbox(infra, partitions=1) as box:
        conn = await connect(infra.database_url, box.schema)
        try:
            key = await seed_runs(conn, box.schema, n)
            # One run with 50 HTTP steps, each with a request and an answer, for the detail page.
            big = await conn.fetchval(
                "SELECT id FROM runs WHERE environment = 'PRODUCTION' ORDER BY created_at DESC OFFSET 10 LIMIT 1"
            )
            now = datetime.now(UTC)
            steps = [
                (big, f"step{i:02d}", i, "http_request", "SUCCEEDED", 1,
                 {"method": "GET", "url": f"https://x.example.com/items/{i}"},
                 {"status": 200, "headers": {"content-type": "application/json"}, "body": {"ok": True, "i": i}},
                 None, now, now + timedelta(milliseconds=5), 5.0)
                for i in range(STEPS)
            ]  # fmt: skip
            await copy_rows(conn, "run_steps", STEP_COLUMNS, steps, box.schema)
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

        stack = Stack.build(box, ("api",), log_dir)
        await stack.start()
        try:
            url = stack["api"].url
            # The page's own call: the first 50 runs of the last 24 hours, newest first.
            params: dict[str, str | int] = {"limit": 50, "from": (datetime.now(UTC) - timedelta(days=1)).isoformat()}
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as api:
                api_ms = []
                for i in range(SAMPLES + 2):
                    started = time.perf_counter()
                    r = await api.get("/v1/runs", params=params)
                    assert r.status_code == 200 and len(r.json()["data"]) == 50, r.text
                    if i >= 2:
                        api_ms.append((time.perf_counter() - started) * 1000)

            async with headless_chromium() as browser:
                context = await signed_in(browser, key)
                page = await context.new_page()
                usable_ms, list_ms = [], []
                for i in range(SAMPLES + 2):
                    await page.goto(f"{url}/?sample={i}#/runs")  # a new document each time, not a hash change
                    await page.locator("tr[data-run]").nth(49).wait_for()
                    # Marked by the page once the rows are rendered (services/api/console/static/runs.js).
                    shown = await page.evaluate("performance.getEntriesByName('runs-rendered')[0].startTime")
                    call = await page.evaluate(
                        "performance.getEntriesByType('resource').filter(e => e.name.includes('/v1/runs?'))"
                        ".map(e => e.duration)[0]"
                    )
                    if i >= 2:
                        usable_ms.append(shown)
                        list_ms.append(call)
                detail_ms = []
                for i in range(SAMPLES + 2):
                    await page.goto(f"{url}/?sample={i}#/runs/{big}")
                    await page.locator("ol.timeline li").nth(STEPS - 1).wait_for()
                    if i >= 2:
                        detail_ms.append(
                            await page.evaluate("performance.getEntriesByName('run-rendered')[0].startTime")
                        )
                await context.close()
        finally:
            stack.stop()

    label = f"{n / 1e6:g}M runs" if n >= 1_000_000 else f"{n:,} runs"
    report.add_ceiling("console.api_p50", f"GET /v1/runs p50, the page's call ({label})", percentile(api_ms, 50), "ms")
    report.add("query", f"runs page usable p50 (open → 50 runs rendered, {label})", percentile(usable_ms, 50), "ms",
               ceiling="console.api_p50", target=Target("<=", USABLE_MS, unit="ms"))  # fmt: skip
    report.add("query", f"runs page usable p95 ({label})", percentile(usable_ms, 95), "ms",
               target=Target("<=", USABLE_MS, unit="ms"))  # fmt: skip
    report.add("query", f"runs page: its list call in the browser, p50 ({label})", percentile(list_ms, 50), "ms")
    report.add("query", f"run detail of a {STEPS}-step run on screen, p50 (open → steps rendered)",
               percentile(detail_ms, 50), "ms")  # fmt: skip
