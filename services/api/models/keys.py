"""API keys (a key's plaintext only in the answers that create it)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from services.api.models import Out


class ApiKey(Out):
    id: str
    name: str
    prefix: str
    environment: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    rotated_at: datetime | None = None
    replaced_by: str | None = None
    status: Literal["active", "rotated", "expired", "revoked"]


class NewApiKey(ApiKey):
    key: str = Field(description="the plaintext key, shown this once")


class RotatedApiKey(NewApiKey):
    previous: ApiKey


class ApiKeys(Out):
    data: list[ApiKey]
