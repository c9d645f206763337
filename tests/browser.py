"""A real browser for the console's tests (docs/console.md): Debian's `chromium`, installed with apt-get when missing
(as the launcher installs `postgresql`), driven by Playwright for Python. Playwright's own browser download is never
used; a test that cannot get the browser fails, it does not skip."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
from playwright.async_api import Browser, BrowserContext, async_playwright

from tests.debian import debian_binary

CHROMIUM = Path("/usr/bin/chromium")


def chromium() -> Path:
    """Debian's chromium, installed with `apt-get install chromium` when it is missing and we are root."""
    return debian_binary(CHROMIUM, "chromium")


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[Browser]:
    """A headless Chromium for the duration of the block."""
    async with async_playwright() as playwright:
        # --no-sandbox: tests run as root in containers, where Chromium's sandbox cannot start.
        browser = await playwright.chromium.launch(executable_path=str(chromium()), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


async def signed_in(browser: Browser, key: str) -> BrowserContext:
    """A browser context whose tabs start signed in to the console with `key` (the key in session storage, as the
    sign-in form leaves it; the page then asks GET /v1/session for the key's scopes, see
    services/api/console/static/api.js), at a laptop's 1280 x 900."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    await context.add_init_script(f"sessionStorage.setItem('flowtrail.key', {orjson.dumps(key).decode()});")
    return context
