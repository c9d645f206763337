"""Tenant secrets as the API shows them: never their values."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from services.api.models import Out


class SecretView(Out):
    """A secret as the API shows it: never its value."""

    name: str
    environment: str
    version: int = Field(description="1 when created, + 1 each time a new value is written")
    created_at: datetime
    last_rotated_at: datetime = Field(description="when the value was last written (created or rotated)")
    reference: str = Field(description="how a step input uses it", examples=["{{ secrets.shop_token }}"])


class SecretList(Out):
    data: list[SecretView]
