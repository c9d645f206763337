-- Tenant administration (docs/tenants.md): the operator API creates tenants and changes their retention and quota.
-- `max_active_runs` is the tenant's stored quota of active runs (NULL: none of its own); the executor still reads
-- its quotas from FLOWTRAIL_EXECUTOR_TENANT_QUOTAS until it reads this column.

ALTER TABLE tenants
    ADD COLUMN max_active_runs  int CHECK (max_active_runs > 0),
    ADD COLUMN updated_at       timestamptz NOT NULL DEFAULT now();
