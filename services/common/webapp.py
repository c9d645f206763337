"""The one way a Flowtrail HTTP service (the API, ingest) is built: the JSON response class, the middleware stack
in its order, and the request ids, error envelope, /healthz, /readyz and /metrics of `install`."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI

from services.common.bodylimit import BodyLimit
from services.common.http import OrjsonResponse, install
from services.common.idempotency import Idempotency
from services.common.ratelimit import RateLimitHeaders
from services.common.startup import UntilMigrated

Ready = Callable[[FastAPI], Awaitable[dict[str, str | None]]]


def service_app(
    title: str,
    settings: Any,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    *,
    ready: Ready,
    max_body_bytes: int,
    trigger_body_bytes: int | None = None,
    **fastapi: Any,
) -> FastAPI:
    """A FastAPI app with `settings` on its state and the shared stack, innermost first: the idempotency key check
    (it reads the whole body, bounded by then), the body limit, 503 until the database is migrated, request ids and
    error envelopes, rate-limit headers (docs/intake.md). `trigger_body_bytes`: the body limit of the routes that start
    runs, when not `max_body_bytes`."""
    app = FastAPI(title=title, default_response_class=OrjsonResponse, lifespan=lifespan, **fastapi)
    app.state.settings = settings
    app.add_middleware(Idempotency)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, trigger_max_bytes=trigger_body_bytes)
    app.add_middleware(UntilMigrated, database=lambda: getattr(app.state, "database", None))
    install(app, ready=functools.partial(ready, app))
    app.add_middleware(RateLimitHeaders)
    return app
