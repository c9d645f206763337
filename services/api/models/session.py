"""The calling key's own session: who it is, what it may do, its rate limits (`GET /v1/session`)."""

from __future__ import annotations

from pydantic import Field

from services.api.models import Out
from services.api.models.keys import ApiKey


class RateLimits(Out):
    """This API's per-key budget (docs/api-contract.md): requests per window, by class."""

    reads: int
    writes: int
    triggers: int = Field(description="POST /v1/flows/{id}/trigger, as this deployment's API counts it")
    window_s: int


class Session(Out):
    tenant_id: str
    environment: str = Field(description="PRODUCTION (an `ft_live_` key) or TESTING (`ft_test_`): the data it sees")
    scopes: list[str] = Field(description="what the key may do; `admin` implies every other scope")
    key: ApiKey = Field(description="the key itself, as `GET /v1/api-keys/{id}` shows it to an admin")
    rate_limits: RateLimits | None = Field(description="null when this API does not limit requests")
