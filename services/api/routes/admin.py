"""Tenant administration (docs/tenants.md): the operator routes `/v1/admin/tenants…` under the deployment's operator
key, and `GET /v1/tenant`, a tenant's own retention and quota as its admin key reads them.

The operator key (FLOWTRAIL_API_OPERATOR_KEY) is no tenant's API key: it is compared in constant time with the
configured one and never looked up in `api_keys`. Without one configured the operator routes answer 403
`operator_api_disabled`; a tenant's key, even an admin one, answers 403 `forbidden`.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.api.models.admin import (
    MAX_ACTIVE_RUNS,
    MAX_RETENTION_DAYS,
    MIN_RETENTION_DAYS,
    AdminTenant,
    NewTenant,
    Quotas,
    Retention,
    Tenant,
    Tenants,
    retention_problem,
)
from services.api.models.keys import NewApiKey
from services.api.routes import Admin, found
from services.api.routes.keys import get_key
from services.common.auth import Principal, create_api_key
from services.common.contract import SCOPE_ATTRIBUTE
from services.common.http import ApiError, check_query_names, raise_bad_input

router = APIRouter()

OPERATOR_SCOPE = "operator"  # what the OpenAPI notes for these routes (services/common/contract.py)
_TENANT_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_SELECT = """
    SELECT t.id, t.name, t.created_at, t.updated_at, t.retention_days, t.payload_retention_days, t.max_active_runs,
           m.purged_at AS last_purge_at,
           (SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id AND k.revoked_at IS NULL
               AND (k.expires_at IS NULL OR k.expires_at > now())) AS active_api_keys
    FROM tenants t LEFT JOIN retention_marks m ON m.tenant_id = t.id
"""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def _operator(request: Request) -> None:
    """The request must carry the deployment's operator key: 401 without a bearer token, 403 otherwise."""
    header = request.headers.get("authorization")
    if not header or not header.lower().startswith("bearer "):
        raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <operator key>'")
    configured = request.app.state.settings.operator_key.get_secret_value()
    if not configured:
        raise ApiError(
            403, "operator_api_disabled",
            "this deployment has no operator key: set FLOWTRAIL_API_OPERATOR_KEY on the API (docs/tenants.md)",
        )  # fmt: skip
    # Digests of equal length, compared in constant time: neither the key nor its length shows in the timing.
    if not hmac.compare_digest(_digest(header[7:].strip()), _digest(configured)):
        raise ApiError(
            403, "forbidden", "the operator routes take the deployment's operator key, not a tenant's API key"
        )
    raise_bad_input(request)
    check_query_names(request)


setattr(_operator, SCOPE_ATTRIBUTE, OPERATOR_SCOPE)
Operator = Annotated[None, Depends(_operator)]


class RetentionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata_days: int | None = Field(default=None, ge=MIN_RETENTION_DAYS, le=MAX_RETENTION_DAYS)
    payload_days: int | None = Field(default=None, ge=MIN_RETENTION_DAYS, le=MAX_RETENTION_DAYS)


class QuotasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_active_runs: int | None = Field(default=None, ge=1, le=MAX_ACTIVE_RUNS, description="null: no quota of its own")


class NewTenantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=_TENANT_ID, description="default: `tn_` and 16 random hex digits")
    name: str = Field(min_length=1, max_length=200)
    environment: Literal["PRODUCTION", "TESTING"] = Field(
        default="PRODUCTION", description="the first admin key's environment (`ft_live_` or `ft_test_`)"
    )
    retention: RetentionBody | None = Field(default=None, description="default: 90 days of runs, 7 of payloads")
    quotas: QuotasBody | None = None


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    retention: RetentionBody | None = None
    quotas: QuotasBody | None = None


def _tenant_fields(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "retention": Retention(metadata_days=row["retention_days"], payload_days=row["payload_retention_days"]),
        "quotas": Quotas(max_active_runs=row["max_active_runs"]),
        "last_purge_at": row["last_purge_at"],
    }


def _admin_tenant(row: asyncpg.Record) -> AdminTenant:
    return AdminTenant(**_tenant_fields(row), active_api_keys=row["active_api_keys"])


def _checked(metadata_days: int, payload_days: int) -> None:
    problem = retention_problem(metadata_days, payload_days)
    if problem is not None:
        raise ApiError(422, "validation_error", problem)


async def _tenant_or_404(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str) -> asyncpg.Record:
    return found(await conn.fetchrow(f"{_SELECT} WHERE t.id = $1", tenant_id), "tenant", tenant_id)


@router.post("/v1/admin/tenants", status_code=201, response_model_exclude_unset=True)
async def create_tenant(body: NewTenantBody, request: Request, _: Operator) -> NewTenant:
    """A tenant and its first API key (scope `admin`). The plaintext `admin_key.key` is in this answer only."""
    retention = body.retention or RetentionBody()
    metadata_days = retention.metadata_days or 90
    payload_days = retention.payload_days or min(7, metadata_days)
    _checked(metadata_days, payload_days)
    tenant_id = body.id or "tn_" + uuid.uuid4().hex[:16]
    max_active_runs = body.quotas.max_active_runs if body.quotas else None
    async with request.app.state.pool.acquire() as conn:
        async with conn.transaction():
            created = await conn.fetchval(
                "INSERT INTO tenants (id, name, retention_days, payload_retention_days, max_active_runs) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING RETURNING id",
                tenant_id, body.name, metadata_days, payload_days, max_active_runs,
            )  # fmt: skip
            if created is None:
                raise ApiError(409, "conflict", f"a tenant with id {tenant_id!r} exists already")
            key_id, key = await create_api_key(
                conn, tenant_id, environment=body.environment, scopes=["admin"], name="first admin key"
            )
        row = await _tenant_or_404(conn, tenant_id)
    shown = await get_key(key_id, request, Principal(key_id, tenant_id, body.environment, frozenset({"admin"})))
    return NewTenant(**_admin_tenant(row).model_dump(), admin_key=NewApiKey(**shown.model_dump(), key=key))


@router.get("/v1/admin/tenants", response_model_exclude_unset=True)
async def list_tenants(
    request: Request,
    _: Operator,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=200, description="the `next_after` of the previous page")] = None,
) -> Tenants:
    """Every tenant, by id."""
    rows = await request.app.state.pool.fetch(
        f"{_SELECT} WHERE $1::text IS NULL OR t.id > $1 ORDER BY t.id LIMIT $2", after, limit + 1
    )
    more = len(rows) > limit
    data = [_admin_tenant(r) for r in rows[:limit]]
    return Tenants(data=data, has_more=more, next_after=data[-1].id if more else None)


@router.get("/v1/admin/tenants/{tenant_id}", response_model_exclude_unset=True)
async def get_tenant(tenant_id: str, request: Request, _: Operator) -> AdminTenant:
    return _admin_tenant(await _tenant_or_404(request.app.state.pool, tenant_id))


@router.patch("/v1/admin/tenants/{tenant_id}", response_model_exclude_unset=True)
async def update_tenant(tenant_id: str, body: TenantPatch, request: Request, _: Operator) -> AdminTenant:
    """Fields left out keep their value. Shorter retention applies at the projector's next purge
    (FLOWTRAIL_PROJECTOR_RETENTION_INTERVAL_S); a longer one cannot bring back what a purge already removed."""
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        current = found(
            await conn.fetchrow("SELECT * FROM tenants WHERE id = $1 FOR UPDATE", tenant_id), "tenant", tenant_id
        )
        retention = body.retention or RetentionBody()
        metadata_days = retention.metadata_days or current["retention_days"]
        payload_days = retention.payload_days or current["payload_retention_days"]
        _checked(metadata_days, payload_days)
        quotas = body.quotas.model_dump(exclude_unset=True) if body.quotas else {}
        max_active_runs = quotas.get("max_active_runs", current["max_active_runs"])
        await conn.execute(
            "UPDATE tenants SET name = $2, retention_days = $3, payload_retention_days = $4, max_active_runs = $5, "
            "updated_at = now() WHERE id = $1",
            tenant_id, body.name or current["name"], metadata_days, payload_days, max_active_runs,
        )  # fmt: skip
        return _admin_tenant(await _tenant_or_404(conn, tenant_id))


@router.get("/v1/tenant", response_model_exclude_unset=True)
async def own_tenant(request: Request, principal: Admin) -> Tenant:
    """The calling key's tenant: its retention periods and quota, as the operator set them."""
    row = await _tenant_or_404(request.app.state.pool, principal.tenant_id)
    return Tenant(**_tenant_fields(row))
