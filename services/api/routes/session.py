"""`GET /v1/session`: the calling key's tenant, environment, scopes and rate limits, so a client (the web console,
docs/console.md) can tell what it may do without trying it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.api.models.session import RateLimits, Session
from services.api.routes import Reader
from services.api.routes.keys import get_key
from services.common.ratelimit import RateLimiter

router = APIRouter()


@router.get("/v1/session")
async def get_session(request: Request, principal: Reader) -> Session:
    """Any key that reads runs may read its own session; it needs no `admin` scope to see itself."""
    limiter: RateLimiter | None = request.app.state.authenticator.limiter
    return Session(
        tenant_id=principal.tenant_id,
        environment=principal.environment,
        scopes=sorted(principal.scopes),
        key=await get_key(principal.key_id, request, principal),
        rate_limits=None if limiter is None else RateLimits.model_validate(limiter.limits, from_attributes=True),
    )
