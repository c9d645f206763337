"""The web console (docs/console.md) in a real browser against the real stack: the demo's flows and runs, signed in
with a demo key, driven through headless Chromium (tests/browser.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, Page, expect

from deploy.launcher.demo_flows import API_TEST, APPROVAL, ORDER_SYNC, demo_flows, demo_inputs
from deploy.launcher.demo_upstream import DemoUpstream
from services.api import console
from tests.browser import headless_chromium, signed_in
from tests.conftest import Infra, make_sandbox
from tests.harness import TERMINAL, Env, KeySpec, api_in_process, running, stub_upstream, wait_until

TENANT = "demo"
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".state" / "screenshots"


@dataclass
class Systems(DemoUpstream):
    """The demo's shop, ERP, users API and warehouse, with a users API that can answer a stale email (the API test's
    `body.email` assertion then fails)."""

    misbehave: bool = False

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(request.match_info["id"])
        if user is not None and self.misbehave:
            return web.json_response({**user, "email": "ada@old.example"})
        return await super()._get_user(request)


@dataclass
class Demo:
    env: Env
    systems: Systems
    runs: dict[str, dict[str, Any]]  # a name for each demo run → its detail once final (or paused)

    @property
    def url(self) -> str:
        return self.env.url("api") + "/"


@pytest.fixture(scope="module")
async def demo(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Demo]:
    systems = Systems(orders=DemoUpstream.seeded().orders, misbehave=True)  # the demo's shop, a users API gone stale
    async with stub_upstream({}, systems.app()) as up, running(
        infra, tmp_path_factory, keys={"demo": TENANT, "reader": KeySpec(TENANT, scopes=["runs:read"], name="viewer")},
        upstream=up, env={"FLOWTRAIL_INGEST_SCHEDULER": "false"},
    ) as env:  # fmt: skip
        await env.publish(demo_flows(TENANT, ingest=env.url("ingest"), api=env.url("api"), upstream=up.url))
        started = {
            "partial": await env.trigger(ORDER_SYNC),
            "assertion": await env.trigger(API_TEST),
            "paused": await env.trigger(APPROVAL, demo_inputs(APPROVAL, 1)[0]),
            "auth": await env.trigger("demo-invoice-push", demo_inputs("demo-invoice-push", 1)[0]),
            **{f"order-{i}": await env.trigger("demo-order-sync", p)
               for i, p in enumerate(demo_inputs("demo-order-sync", 3))},
        }  # fmt: skip
        runs = {}
        for name, run_id in started.items():
            wanted = {"PAUSED"} if name == "paused" else None
            # The first runs wait for the executor to be given its partitions, slow on a busy machine.
            runs[name] = await env.wait_status(run_id, wanted or TERMINAL, within=90)
        assert runs["partial"]["status"] == "PARTIAL" and runs["assertion"]["status"] == "FAILED", runs
        yield Demo(env, systems, runs)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with headless_chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
async def signed_in_tabs(browser: Browser, demo: Demo) -> AsyncIterator[BrowserContext]:
    """A browser context whose tabs are signed in with the demo key (as the sign-in form leaves them)."""
    context = await signed_in(browser, demo.env.key)
    yield context
    await context.close()


@pytest.fixture
async def page(signed_in_tabs: BrowserContext) -> AsyncIterator[Page]:
    page = await signed_in_tabs.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await page.close()
    assert not errors, errors  # no script error on any page a test opened


def row(page: Page, run_id: str) -> Any:
    return page.locator(f"tr[data-run='{run_id}']")


async def open_run(page: Page, demo: Demo, run_id: str) -> None:
    await page.goto(f"{demo.url}#/runs/{run_id}")
    await expect(page.get_by_role("heading", level=1)).to_contain_text(run_id)


async def reloads(page: Page) -> list[str]:
    """Counts full page loads from now on (a live page changes without any)."""
    loads: list[str] = []
    page.on("load", lambda p: loads.append(p.url))
    return loads


# ---------------------------------------------------------------- sign-in and the runs list


async def test_sign_in_with_the_demo_key_shows_the_demo_runs(browser: Browser, demo: Demo) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    try:
        await page.goto(demo.url)
        await page.get_by_label("API key").fill("ft_live_" + "x" * 43)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("alert")).to_contain_text("refused")

        await page.get_by_label("API key").fill(demo.env.key)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("table", name="Runs")).to_be_visible()
        for name, run in demo.runs.items():
            await expect(row(page, run["id"])).to_contain_text(run["status"]), name
        await expect(row(page, demo.runs["assertion"]["id"])).to_contain_text("fetch_user")
        await expect(page.get_by_role("button", name="Archive selected…")).to_be_visible()  # the key may write
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=SCREENSHOTS / "runs-list.png", full_page=True)

        # The key lives in this tab only; a key the API refuses later sends the person back to sign in.
        assert await page.evaluate("sessionStorage.getItem('flowtrail.key')") == demo.env.key
        await page.evaluate("sessionStorage.setItem('flowtrail.key', 'ft_live_' + 'y'.repeat(43))")
        await page.reload()
        await expect(page.get_by_role("heading", name="Sign in to Flowtrail")).to_be_visible()
        await expect(page.get_by_role("status")).to_contain_text("sign in again")
    finally:
        await context.close()


async def sign_in(browser: Browser, demo: Demo, key: str) -> tuple[BrowserContext, Page, list[str]]:
    """A new tab signed in through the form with `key`, and the API paths it has asked for."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    asked: list[str] = []
    page.on("request", lambda r: asked.append(f"{r.method} {r.url.removeprefix(demo.env.url('api'))}"))
    await page.goto(demo.url)
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("table", name="Runs")).to_be_visible()
    return context, page, asked


WRITES = ["Retry selected…", "Cancel selected…", "Archive selected…", "Retry all matching…", "Archive all matching…"]


async def test_the_keys_scopes_decide_which_buttons_appear(browser: Browser, demo: Demo) -> None:
    reader = demo.env.keys["reader"]
    session = await demo.env.ok("GET", "/v1/session", reader)
    assert session["tenant_id"] == TENANT and session["environment"] == "PRODUCTION", session
    assert session["scopes"] == ["runs:read"] and session["key"]["id"] == demo.env.key_ids["reader"], session
    assert reader.startswith(session["key"]["prefix"]) and session["rate_limits"]["reads"] > 0, session
    failed, flow = demo.runs["assertion"]["id"], f"{demo.url}#/flows/{API_TEST}"

    context, page, asked = await sign_in(browser, demo, reader)
    try:
        await expect(page.get_by_role("banner")).to_contain_text(f"{TENANT} · viewer")  # who is signed in
        await expect(row(page, failed)).to_be_visible()
        for name in WRITES:
            await expect(page.get_by_role("button", name=name)).to_have_count(0)
        await open_run(page, demo, failed)
        await expect(page.get_by_role("heading", level=1)).to_contain_text("FAILED")
        for name in ["Retry from the failed step", "Re-run on the latest version", "Cancel", "Archive"]:
            await expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)
        await page.goto(flow)
        await expect(page.get_by_role("heading", level=1)).to_contain_text("Create user then fetch it")
        await expect(page.get_by_role("button", name="Pause flow")).to_have_count(0)
        await expect(page.get_by_role("form", name="Trigger")).to_have_count(0)
        # Sign-in asked the key's session, and tried no write to find out what the key may do.
        assert "GET /v1/session" in asked and not [a for a in asked if a.startswith("POST")], asked
    finally:
        await context.close()

    context, page, asked = await sign_in(browser, demo, demo.env.key)  # every scope
    try:
        for name in WRITES:
            await expect(page.get_by_role("button", name=name)).to_be_visible()
        await open_run(page, demo, failed)
        for name in ["Retry from the failed step", "Re-run on the latest version", "Archive"]:
            await expect(page.get_by_role("button", name=name, exact=True)).to_be_visible()
        await page.goto(flow)
        await expect(page.get_by_role("button", name="Pause flow")).to_be_visible()
        await expect(page.get_by_role("form", name="Trigger")).to_be_visible()
        assert not [a for a in asked if a.startswith("POST")], asked
    finally:
        await context.close()


async def test_filter_by_status_and_search_an_error_substring(page: Page, demo: Demo) -> None:
    await page.goto(demo.url)
    await page.get_by_role("combobox", name="Status", exact=True).select_option("FAILED")
    await page.get_by_role("button", name="Apply").click()
    failed = {demo.runs["assertion"]["id"], demo.runs["auth"]["id"]}
    await expect(page.locator("tr[data-run]")).to_have_count(len(failed))
    assert {await r.get_attribute("data-run") for r in await page.locator("tr[data-run]").all()} == failed
    assert "status=FAILED" in page.url

    await page.get_by_role("button", name="Reset").click()
    await expect(page.locator("tr[data-run]")).to_have_count(len(demo.runs))
    await page.get_by_label("Search: run id or error text").fill("customer email")  # NetSuite's refusal, any case
    await page.get_by_label("Search: run id or error text").press("Enter")
    await expect(page.locator("tr[data-run]")).to_have_count(1)
    await expect(row(page, demo.runs["partial"]["id"])).to_contain_text("PARTIAL")


# ---------------------------------------------------------------- run detail


async def test_the_partial_run_shows_the_refused_records_field_path(page: Page, demo: Demo) -> None:
    partial = demo.runs["partial"]
    await open_run(page, demo, partial["id"])
    refused = page.get_by_role("table", name="Refused records")
    await expect(refused.get_by_test_id("field-path")).to_have_text("email")
    await expect(refused).to_contain_text("Please enter value(s) for: Customer Email")
    await expect(page.get_by_role("region", name="Records")).to_contain_text("failed1")
    await expect(page.get_by_role("region", name="Run")).to_contain_text("1 record(s) failed")
    await page.screenshot(path=SCREENSHOTS / "run-detail-partial.png", full_page=True)


async def test_a_failed_assertion_shows_actual_and_expected_and_its_retry_finishes_live(page: Page, demo: Demo) -> None:
    failed = demo.runs["assertion"]
    await open_run(page, demo, failed["id"])
    # The failed step is selected: its request, answer and the assertion that failed.
    step = page.get_by_role("region", name="Step fetch_user")
    wrong = step.locator("tr[data-passed='false']")
    await expect(wrong.get_by_test_id("actual")).to_have_text('"ada@old.example"')
    await expect(wrong.get_by_test_id("expected")).to_have_text('"ada@example.com"')
    await expect(step.locator("tr[data-passed='true']")).to_contain_text("status")
    passed = page.get_by_role("button", name="succeeded create_user http_request")
    await expect(passed.get_by_role("img", name="succeeded")).to_have_text("✓")
    await expect(page.get_by_role("button", name="failed fetch_user").get_by_role("img")).to_have_text("✗")
    await page.screenshot(path=SCREENSHOTS / "run-detail.png", full_page=True)

    demo.systems.misbehave = False  # the users API is fixed; the retry reuses create_user and fetches again
    loads = await reloads(page)
    await page.get_by_role("button", name="Retry from the failed step").click()
    await expect(page).not_to_have_url(f"{demo.url}#/runs/{failed['id']}")
    retry_id = page.url.rsplit("/", 1)[1]
    await expect(page.get_by_role("heading", level=1)).to_contain_text("SUCCEEDED", timeout=30_000)
    await expect(page.get_by_role("region", name="Run")).to_contain_text(failed["id"])  # "retry of" links back
    assert loads == []  # it got there live, not by reloading
    retried = await demo.env.wait_status(retry_id)
    assert retried["status"] == "SUCCEEDED" and retried["retry_of"] == failed["id"]


async def test_a_failed_run_shows_its_diagnosis_and_a_run_that_succeeded_none(page: Page, demo: Demo) -> None:
    await open_run(page, demo, demo.runs["assertion"]["id"])
    panel = page.get_by_role("region", name="Diagnosis")
    await expect(panel.get_by_test_id("root-cause")).to_have_text("data / validation")
    await expect(panel.get_by_test_id("diagnosis-assertion")).to_contain_text('actual "ada@old.example"')
    await expect(panel.get_by_test_id("next-action")).to_contain_text("saw 'ada@old.example'")
    await expect(panel.get_by_role("table", name="Evidence")).to_contain_text("assertion_failed")
    await panel.screenshot(path=SCREENSHOTS / "run-diagnosis.png")
    succeeded = next(r for r in demo.runs.values() if r["status"] == "SUCCEEDED")
    await open_run(page, demo, succeeded["id"])
    await expect(page.get_by_role("region", name="Run")).to_be_visible()
    await expect(page.get_by_role("region", name="Diagnosis")).to_have_count(0)


async def test_a_paused_run_is_resumed_through_the_form(page: Page, demo: Demo) -> None:
    paused = demo.runs["paused"]
    await open_run(page, demo, paused["id"])
    form = page.get_by_role("form", name="Resume")
    await expect(form).to_contain_text("Ship order #1004")
    loads = await reloads(page)
    await form.get_by_label("approved").fill("true")
    await form.get_by_label("carrier").fill("DHL")
    await form.get_by_role("button", name="Resume").click()
    await expect(page.get_by_role("heading", level=1)).to_contain_text("SUCCEEDED", timeout=30_000)
    await expect(page.get_by_role("button", name="succeeded ship http_request")).to_be_visible()
    assert loads == []
    run = await demo.env.wait_status(paused["id"])
    assert {s["name"]: s for s in run["steps"]}["approve"]["output"] == {"approved": True, "carrier": "DHL"}


async def test_the_runs_list_shows_a_new_run_and_its_end_live(page: Page, demo: Demo) -> None:
    await page.goto(f"{demo.url}#/runs?flow_id={API_TEST}")
    await expect(row(page, demo.runs["assertion"]["id"])).to_be_visible()
    loads = await reloads(page)
    run_id = await demo.env.trigger(API_TEST)  # the users API answers right again since the retry above
    await expect(row(page, run_id)).to_contain_text("SUCCEEDED", timeout=30_000)
    await expect(page.locator("tr[data-run]").first).to_have_attribute("data-run", run_id)  # newest first
    assert loads == []


async def test_the_time_travel_scrubber_shows_the_run_as_it_was(page: Page, demo: Demo) -> None:
    run = demo.runs["order-0"]
    await open_run(page, demo, run["id"])
    heading = page.get_by_role("heading", level=1)
    await expect(heading).to_contain_text("SUCCEEDED")
    scrubber = page.get_by_role("slider", name="Time travel")
    await scrubber.focus()
    await scrubber.press("Home")  # keyboard: back to the first event
    await expect(page.get_by_role("status")).to_contain_text("the run as it was after event #0")
    await expect(heading).not_to_contain_text("SUCCEEDED")
    earlier = await page.locator("h1 .status").inner_text()
    assert earlier in {"CREATED", "QUEUED"}, earlier
    await scrubber.press("ArrowRight")
    await scrubber.press("ArrowRight")
    await expect(page.get_by_role("status")).to_contain_text("after event #")
    await page.get_by_role("button", name="Now", exact=True).click()
    await expect(heading).to_contain_text("SUCCEEDED")


# ---------------------------------------------------------------- bulk actions and analytics


async def archive_after_the_dry_run(page: Page, demo: Demo, button: str, what: str, run_ids: Iterable[str]) -> None:
    """Clicks a bulk archive `button`: the dialog shows the dry run (`what` would be archived) while nothing has
    changed yet; confirmed, the page says how many runs the archive took."""
    await page.get_by_role("button", name=button).click()
    dialog = page.get_by_role("dialog", name="Bulk archive")
    await expect(dialog.get_by_test_id("dry-run")).to_have_text(f"Dry run: {what} would be archived.")
    for run_id in run_ids:  # nothing changed yet
        assert (await demo.env.run(run_id) or {}).get("archived") is False
    count = what.split()[0]
    await dialog.get_by_role("button", name=f"Archive {count} run(s)").click()
    await expect(page.get_by_role("status")).to_contain_text(f"archive: {count} run(s)")


async def test_bulk_archive_shows_the_dry_run_count_first(page: Page, demo: Demo) -> None:
    orders = [r["id"] for n, r in demo.runs.items() if n.startswith("order-")]
    await page.goto(f"{demo.url}#/runs?flow_id=demo-order-sync")
    await expect(page.locator("tr[data-run]")).to_have_count(len(orders))
    await page.get_by_label("Select every run on this page").check()
    await archive_after_the_dry_run(
        page, demo, "Archive selected…", f"{len(orders)} of {len(orders)} selected run(s)", orders
    )
    await expect(page.locator("tr[data-run]")).to_have_count(0, timeout=30_000)
    await page.get_by_label("archived too").check()
    await page.get_by_role("button", name="Apply").click()
    await expect(page.locator("tr[data-run]")).to_have_count(len(orders))
    await expect(page.get_by_text("(archived)")).to_have_count(len(orders))


async def test_analytics_draws_charts_from_the_demo_runs(page: Page, demo: Demo) -> None:
    await page.goto(f"{demo.url}#/analytics?flow_id=demo-order-sync")
    await expect(page.get_by_test_id("analytics-summary")).to_contain_text("3 run(s), pass rate 100 %")
    chart = page.get_by_role("figure", name="Runs by status")
    await expect(chart.locator("canvas")).to_be_visible()
    await expect(chart).to_contain_text("SUCCEEDED")  # the series, named after the runs' status
    # The series is drawn: pixels of its colour on the canvas.
    drawn = await chart.locator("canvas").evaluate(
        """canvas => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
           const near = (i, r, g, b) => Math.abs(d[i] - r) < 24 && Math.abs(d[i + 1] - g) < 24
             && Math.abs(d[i + 2] - b) < 24 && d[i + 3] > 200;
           let n = 0; for (let i = 0; i < d.length; i += 4) if (near(i, 40, 87, 197)) n++;
           return n; }"""
    )
    assert drawn > 200, drawn  # a bar, not a stray pixel
    await expect(page.get_by_role("table", name="Failure groups")).to_contain_text("assertion failed: body.email")
    await expect(page.get_by_role("table", name="Endpoints")).to_contain_text("/healthz")


async def test_a_flows_versions_diff_and_pause(page: Page, demo: Demo) -> None:
    flow = await demo.env.ok("GET", f"/v1/flows/{API_TEST}")
    definition = {k: v for k, v in flow["definition"].items() if k not in ("tenant_id", "version")}
    r = await demo.env.api("POST", f"/v1/flows/{API_TEST}/versions",
                           json={**definition, "description": "Creates a user and reads it back."})  # fmt: skip
    assert r.status_code in (201, 202), r.text
    await wait_until(lambda: _latest(demo, API_TEST, 2), what="version 2 projected")

    await page.goto(f"{demo.url}#/flows/{API_TEST}")
    await expect(page.get_by_role("heading", level=1)).to_contain_text("Create user then fetch it")
    diff = page.get_by_role("region", name="Diff between versions")
    await expect(diff.locator(".del")).to_contain_text("An API test")
    await expect(diff.locator(".add")).to_contain_text("Creates a user and reads it back.")
    await page.get_by_role("button", name="Pause flow").click()
    await expect(page.get_by_role("button", name="Resume flow")).to_be_visible()
    assert (await demo.env.ok("GET", f"/v1/flows/{API_TEST}"))["status"] == "paused"
    await page.get_by_role("button", name="Resume flow").click()
    await expect(page.get_by_role("button", name="Pause flow")).to_be_visible()
    assert (await demo.env.ok("GET", f"/v1/flows/{API_TEST}"))["status"] == "active"


async def _latest(demo: Demo, flow_id: str, version: int) -> bool:
    return bool((await demo.env.ok("GET", f"/v1/flows/{flow_id}"))["latest_version"] == version)


# ---------------------------------------------------------------- the trigger form and bulk actions by filter


async def test_a_run_triggered_from_the_flows_form_reaches_its_end_live(page: Page, demo: Demo) -> None:
    await page.goto(f"{demo.url}#/flows/{API_TEST}")
    form = page.get_by_role("form", name="Trigger")
    loads = await reloads(page)
    await form.get_by_label("Input (JSON)").fill("{not json")
    await form.get_by_role("button", name="Trigger run").click()
    await expect(form.get_by_role("alert")).to_contain_text("Input is not JSON")

    # Sent to ingest (another origin, which allows the console's): the run opens and ends on screen.
    await form.get_by_label("Input (JSON)").fill('{"from": "the console"}')
    await form.get_by_label("Idempotency key (optional)").fill("console-trigger-1")
    await form.get_by_role("button", name="Trigger run").click()
    await expect(page).to_have_url(re.compile(r"#/runs/run_"))
    run_id = page.url.rsplit("/", 1)[1]
    heading = page.get_by_role("heading", level=1)
    await expect(heading).to_contain_text(run_id)
    final = await demo.env.wait_status(run_id)
    await expect(heading.locator(".status")).to_have_text(final["status"], timeout=30_000)
    # Recorded as a manual run by the signed-in key (docs/intake.md#manual-triggers-and-nested-runs).
    assert final["trigger"]["payload"] == {"from": "the console"} and final["trigger_type"] == "manual", final
    assert final["trigger"]["caller"] == demo.env.key_ids["demo"], final
    assert loads == []

    # The same Idempotency-Key names the same run; live mode answers once the run has ended.
    await page.goto(f"{demo.url}#/flows/{API_TEST}")
    await form.get_by_label("Input (JSON)").fill('{"from": "the console"}')
    await form.get_by_label("Idempotency key (optional)").fill("console-trigger-1")
    await form.get_by_role("button", name="Trigger run").click()
    await expect(page).to_have_url(f"{demo.url}#/runs/{run_id}")
    await page.goto(f"{demo.url}#/flows/{API_TEST}")
    await form.get_by_label("Mode").select_option("live")
    await form.get_by_role("button", name="Trigger run").click()
    await expect(page).not_to_have_url(re.compile(f"#/flows/|{run_id}"), timeout=60_000)
    live = (await demo.env.run(page.url.rsplit("/", 1)[1])) or {}
    assert live.get("status") in TERMINAL and live["execution_mode"] == "live", live
    await expect(page.get_by_role("heading", level=1).locator(".status")).to_have_text(live["status"])
    assert loads == []


async def test_bulk_archive_by_the_lists_status_filter_shows_the_dry_run_count_first(page: Page, demo: Demo) -> None:
    await page.goto(f"{demo.url}#/runs?status=FAILED")
    rows = page.locator("tr[data-run]")
    await expect(rows.first).to_be_visible()
    shown = {str(await r.get_attribute("data-run")) for r in await rows.all()}
    api = await demo.env.ok("POST", "/v1/runs/bulk/archive",
                            json={"statuses": ["FAILED"], "include_archived": False, "dry_run": True})  # fmt: skip
    assert api["count"] == len(shown) > 0 and {r["id"] for r in api["sample"]} <= shown, (api, shown)

    loads = await reloads(page)
    what = f"{api['count']} of {api['matched']} run(s) matching the filters"
    await archive_after_the_dry_run(page, demo, "Archive all matching…", what, shown)
    await expect(rows).to_have_count(0, timeout=30_000)
    assert loads == []
    for run_id in shown:
        assert (await demo.env.run(run_id) or {}).get("archived") is True, run_id


# ---------------------------------------------------------------- without its packages


async def test_without_its_packages_the_api_answers_and_the_page_says_how_to_install(
    infra: Infra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "VENDOR", tmp_path / "node_modules")  # as before `make setup`
    async with make_sandbox(infra, 1) as sandbox, api_in_process(sandbox) as client:
        page = await client.get("/")
        assert page.status_code == 503 and "make setup" in page.text, page.text
        assert (await client.get("/console/vendor/preact/dist/preact.module.js")).status_code == 404
        runs = await client.get("/v1/runs")
        assert runs.status_code == 200 and runs.json()["data"] == []
