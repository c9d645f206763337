"""Builds the projector process: the consumer plus a small HTTP server for /healthz and /metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.projector.consumer import Projector


def create_web_app(projector: Projector) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        """Liveness only: the process answers, whether or not its dependencies do (that is /readyz)."""
        return web.json_response(
            {"status": "ok", "assigned": projector.ready.is_set(), "batches": projector.applied_batches}
        )

    async def readyz(request: web.Request) -> web.Response:
        checks = await projector.readiness()
        ok = all(v == "ok" for v in checks.values())
        return web.json_response(
            {"status": "ready" if ok else "unavailable", "checks": checks},
            status=200 if ok else 503,
            headers={} if ok else {"Retry-After": "5"},
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
