"""The web console (docs/console.md): static ES modules served by the API at `/`, talking to the public API.

The console's own files are in `static/`; its third-party modules (preact, htm, uPlot) are installed from the npm
registry into `node_modules/` by `make setup` (`npm ci`) and served from there, never from a CDN. Without them the
API still answers and `/` says how to install them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
STATIC = HERE / "static"
VENDOR = HERE / "node_modules"
# One file of each package the page imports: all present, or the page says how to install them.
NEEDED = ("preact/dist/preact.module.js", "htm/dist/htm.module.js", "uplot/dist/uPlot.esm.js")

NOT_INSTALLED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Flowtrail console: not installed</title></head>
<body style="font: 16px system-ui, sans-serif; max-width: 40em; margin: 4em auto">
<h1>The Flowtrail console is not installed</h1>
<p>The API is running, but the console's JavaScript modules are missing from
<code>services/api/console/node_modules</code>. Install them from the repository's root with</p>
<pre>make setup</pre>
<p>(it runs <code>npm ci</code> in <code>services/api/console</code>), then reload this page.</p>
</body></html>
"""

# The page and the console's own modules change with the code: always revalidated (ETag), never stale.
_REVALIDATE = {"Cache-Control": "no-cache"}


class Packages(StaticFiles):
    """The installed packages; while they are missing their files answer 404 (Starlette's check would be a 500)."""

    async def check_config(self) -> None:
        with contextlib.suppress(RuntimeError):  # "directory does not exist": each file is then not found
            await super().check_config()


def installed() -> bool:
    return all((VENDOR / name).is_file() for name in NEEDED)


def mount(app: FastAPI) -> None:
    """Serve the console: the page at `/`, its modules under `/console/`, the packages under `/console/vendor/`."""

    @app.get("/", include_in_schema=False, response_model=None)
    async def page() -> Response:
        if not installed():
            return HTMLResponse(NOT_INSTALLED, status_code=503, headers={"Retry-After": "60"})
        return FileResponse(STATIC / "index.html", headers=_REVALIDATE)

    @app.get("/console/config.json", include_in_schema=False)
    async def config(request: Request) -> JSONResponse:
        """What the page needs of the deployment: where ingest is, for the trigger form (another origin, which
        allows the console's: FLOWTRAIL_INGEST_CORS_ORIGINS)."""
        settings = request.app.state.settings
        ingest = settings.console_ingest_url or str(request.url.replace(port=settings.ingest_port, path="", query=""))
        return JSONResponse({"ingest_url": ingest.rstrip("/")}, headers=_REVALIDATE)

    app.mount("/console/vendor", Packages(directory=VENDOR, check_dir=False), name="console-vendor")
    app.mount("/console", StaticFiles(directory=STATIC), name="console")
