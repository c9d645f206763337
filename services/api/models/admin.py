"""Tenants as the operator API and a tenant's own admin key see them (docs/tenants.md), and the bounds their
retention and quota settings are held to."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from services.api.models import Out
from services.api.models.keys import NewApiKey

# Retention periods an operator may set, in days. Run metadata up to ten years (the standard plan keeps 90 days, an
# enterprise plan 13 months); payload bodies at most as long as the runs they belong to, since a deleted run takes
# its payloads with it.
MIN_RETENTION_DAYS = 1
MAX_RETENTION_DAYS = 3650
MAX_ACTIVE_RUNS = 1_000_000
DEFAULT_METADATA_DAYS = 90
DEFAULT_PAYLOAD_DAYS = 7


def retention_problem(metadata_days: int, payload_days: int) -> str | None:
    """Why a pair of retention periods cannot be a tenant's, or None when it can (each is range-checked by its
    field; this is the rule between them)."""
    if payload_days > metadata_days:
        return (
            f"retention.payload_days ({payload_days}) may not exceed retention.metadata_days ({metadata_days}): "
            "a run's payloads are deleted with the run"
        )
    return None


class Retention(Out):
    metadata_days: int = Field(description="runs (status, steps, events, logs) older than this are deleted")
    payload_days: int = Field(
        description="trigger payloads and step inputs and outputs older than this are blanked (the run stays)"
    )


class Quotas(Out):
    max_active_runs: int | None = Field(
        description="the tenant's stored quota of active (RUNNING or PAUSED) runs; null: none of its own. The "
        "executor enforces FLOWTRAIL_EXECUTOR_TENANT_QUOTAS until it reads this value (docs/tenants.md)"
    )


class Tenant(Out):
    id: str
    name: str
    created_at: datetime
    updated_at: datetime
    retention: Retention
    quotas: Quotas
    last_purge_at: datetime | None = Field(description="when the retention purge last ran for this tenant")


class AdminTenant(Tenant):
    active_api_keys: int = Field(description="keys neither revoked nor expired, in both environments")


class NewTenant(AdminTenant):
    admin_key: NewApiKey = Field(description="the tenant's first key, with the `admin` scope; its `key` is shown once")


class Tenants(Out):
    data: list[AdminTenant]
    has_more: bool
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last one")
