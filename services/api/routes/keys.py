"""API keys: create, list, get, rotate with a grace period, revoke (docs/api-contract.md). Admin scope, caller's
tenant only.

A key's plaintext is returned once, by create and rotate; only its SHA-256 hash is stored. Another tenant's
keys answer 404 like missing ones, so ids cannot be probed. A TESTING key manages TESTING keys only, so a
test credential cannot mint or revoke live ones.
"""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.api.choices import known
from services.api.models.keys import ApiKey, ApiKeys, NewApiKey, RotatedApiKey
from services.api.routes import Admin, found
from services.common.auth import ALL_SCOPES, PREFIX_BY_ENVIRONMENT, Principal, create_api_key
from services.common.http import ApiError
from services.common.ratelimit import forget_key

router = APIRouter()

_SHOWN_SECRET_CHARS = 4  # enough to tell keys apart in a list, too few to matter
_MAX_GRACE_S = 30 * 86_400
_PUBLIC = """
    id, name, prefix, environment, scopes, created_at, expires_at, revoked_at, rotated_at, replaced_by,
    CASE WHEN revoked_at <= now() THEN 'revoked' WHEN expires_at <= now() THEN 'expired'
         WHEN replaced_by IS NOT NULL THEN 'rotated' ELSE 'active' END AS status
"""


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200)
    environment: Literal["PRODUCTION", "TESTING"] = "PRODUCTION"
    # Checked below for a message naming the unknown scope; the OpenAPI lists the accepted ones.
    scopes: list[str] = Field(min_length=1, json_schema_extra={"items": {"type": "string", "enum": list(ALL_SCOPES)}})

    @field_validator("scopes")
    @classmethod
    def _known(cls, scopes: list[str]) -> list[str]:
        return known(scopes, ALL_SCOPES, "scope")


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # How long the old key keeps working; 0 ends it now. Default: FLOWTRAIL_API_KEY_ROTATION_GRACE_S (24 h).
    grace_period_s: float | None = Field(default=None, ge=0, le=_MAX_GRACE_S)


def _environments(principal: Principal) -> list[str]:
    return ["PRODUCTION", "TESTING"] if principal.environment == "PRODUCTION" else ["TESTING"]


def _public(row: asyncpg.Record) -> dict[str, Any]:
    """A key's columns as the API shows them (ApiKey's fields): its prefix cut short, its scopes in order."""
    out = dict(row)
    out["prefix"] = PREFIX_BY_ENVIRONMENT[row["environment"]] + row["prefix"][:_SHOWN_SECRET_CHARS]
    out["scopes"] = sorted(row["scopes"])
    return out


async def _key_or_404(conn: asyncpg.Connection, principal: Principal, key_id: str, *, lock: bool = False) -> Any:
    row = await conn.fetchrow(
        f"SELECT {_PUBLIC} FROM api_keys WHERE id = $1 AND tenant_id = $2 AND environment = ANY($3::text[])"
        + (" FOR UPDATE" if lock else ""),
        key_id, principal.tenant_id, _environments(principal),
    )  # fmt: skip
    return found(row, "API key", key_id)


@router.post("/v1/api-keys", status_code=201, response_model_exclude_unset=True)
async def create_key(body: NewKey, request: Request, principal: Admin) -> NewApiKey:
    """The plaintext `key` is in this answer only: store it in a secret manager."""
    if body.environment not in _environments(principal):
        raise ApiError(403, "forbidden", "a TESTING key can only create TESTING keys")
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        key_id, key = await create_api_key(
            conn, principal.tenant_id, environment=body.environment, scopes=body.scopes, name=body.name
        )
        row = await _key_or_404(conn, principal, key_id)
    return NewApiKey(**_public(row), key=key)


@router.get("/v1/api-keys", response_model_exclude_unset=True)
async def list_keys(request: Request, principal: Admin) -> ApiKeys:
    """Newest first, revoked and expired ones included; never the key or its hash."""
    rows = await request.app.state.pool.fetch(
        f"SELECT {_PUBLIC} FROM api_keys WHERE tenant_id = $1 AND environment = ANY($2::text[]) "
        "ORDER BY created_at DESC, id",
        principal.tenant_id, _environments(principal),
    )  # fmt: skip
    return ApiKeys(data=[ApiKey(**_public(r)) for r in rows])


@router.get("/v1/api-keys/{key_id}", response_model_exclude_unset=True)
async def get_key(key_id: str, request: Request, principal: Admin) -> ApiKey:
    async with request.app.state.pool.acquire() as conn:
        return ApiKey(**_public(await _key_or_404(conn, principal, key_id)))


@router.post("/v1/api-keys/{key_id}/rotate", status_code=201, response_model_exclude_unset=True)
async def rotate_key(key_id: str, request: Request, principal: Admin, body: Rotation | None = None) -> RotatedApiKey:
    """A new key with the same name, environment and scopes; the old one works until the grace period ends."""
    grace = body.grace_period_s if body and body.grace_period_s is not None else None
    if grace is None:
        grace = float(request.app.state.settings.key_rotation_grace_s)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        old = await _key_or_404(conn, principal, key_id, lock=True)
        if old["status"] != "active":
            hint = f"; rotate its replacement {old['replaced_by']}" if old["status"] == "rotated" else ""
            raise ApiError(409, "conflict", f"API key {key_id!r} is {old['status']}{hint}")
        new_id, key = await create_api_key(
            conn, principal.tenant_id, environment=old["environment"], scopes=old["scopes"], name=old["name"]
        )
        old = await conn.fetchrow(
            f"UPDATE api_keys SET rotated_at = now(), replaced_by = $2, "
            f"expires_at = least(coalesce(expires_at, 'infinity'), now() + make_interval(secs => $3::float8)) "
            f"WHERE id = $1 RETURNING {_PUBLIC}",
            key_id, new_id, grace,
        )  # fmt: skip
        new = await _key_or_404(conn, principal, new_id)
    request.app.state.authenticator.forget(key_id)
    return RotatedApiKey(**_public(new), key=key, previous=ApiKey(**_public(old)))


async def _revoke(request: Request, principal: Principal, key_id: str) -> ApiKey:
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await _key_or_404(conn, principal, key_id, lock=True)
        row = await conn.fetchrow(
            f"UPDATE api_keys SET revoked_at = least(coalesce(revoked_at, 'infinity'), now()) "
            f"WHERE id = $1 RETURNING {_PUBLIC}",
            key_id,
        )
        await forget_key(conn, key_id)
    # Here at once; other processes drop their cached copy within the authenticator's TTL (5 s).
    request.app.state.authenticator.forget(key_id)
    return ApiKey(**_public(row))


@router.post("/v1/api-keys/{key_id}/revoke", response_model_exclude_unset=True)
async def revoke_key(key_id: str, request: Request, principal: Admin) -> ApiKey:
    """Stops the key now (a key may revoke itself); revoking twice keeps the first time."""
    return await _revoke(request, principal, key_id)


@router.delete("/v1/api-keys/{key_id}", status_code=204, response_class=Response)
async def delete_key(key_id: str, request: Request, principal: Admin) -> None:
    """Same as revoke: the row stays, so runs keep naming the key that triggered them."""
    await _revoke(request, principal, key_id)
