"""A Python client for Flowtrail's HTTP API (docs/client.md): `Client` (blocking) and `AsyncClient` (asyncio), the
API's own answer models, retries that honour `Retry-After`, Idempotency-Keys on writes, iterators over every
cursor-paged listing and over a run's live event stream.

    from flowtrail.client import Client

    with Client("http://127.0.0.1:8000", "ft_live_...") as client:
        accepted = client.triggers.trigger("orders-sync", {"since": "2026-01-01"})
        run = client.runs.wait(accepted.run_id)
        print(run.status, [s.status for s in run.steps])
"""

from __future__ import annotations

from flowtrail.client import models
from flowtrail.client.api import BulkFilters, Origin, RunFilters
from flowtrail.client.clients import AsyncClient, Client
from flowtrail.client.errors import (
    BadRequest,
    Conflict,
    FlowtrailConnectionError,
    FlowtrailError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from flowtrail.client.plan import NO_RETRY, RetryPolicy, new_idempotency_key

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "BadRequest",
    "BulkFilters",
    "Client",
    "Conflict",
    "FlowtrailConnectionError",
    "FlowtrailError",
    "Forbidden",
    "NotFound",
    "Origin",
    "PayloadTooLarge",
    "RateLimited",
    "RetryPolicy",
    "RunFilters",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationFailed",
    "WaitTimeout",
    "models",
    "new_idempotency_key",
]
