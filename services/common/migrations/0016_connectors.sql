-- Connectors (seed 003): the systems a tenant's steps name (`connector`, `source.connector`,
-- `destination.connector`), and their health.
-- connectors is control-plane (written by the API). connector_health is derived from the ledger by the
-- projector, in the batch that projects the events: a ConnectorDegraded event (a step hit an AUTH error)
-- degrades a connector, a later StepSucceeded of a step whose input named it makes it ok again. Both are
-- compared by event time, never by arrival order, so a rebuild writes the same rows whatever order the
-- partitions interleave in. No column of it defaults to now().

CREATE TABLE connectors (
    tenant_id         text NOT NULL REFERENCES tenants (id),
    id                text NOT NULL,
    name              text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('http', 'postgresql', 'kafka')),
    config            jsonb NOT NULL,          -- url | dsn, health_path, headers, timeout_s
    last_verified_at  timestamptz,
    last_verify       jsonb,                   -- the last verify answer, credentials masked
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE connector_health (
    tenant_id             text NOT NULL,
    connector             text NOT NULL,
    status                text NOT NULL CHECK (status IN ('ok', 'degraded')),
    degraded_since        timestamptz,         -- the first AUTH failure after the last success
    last_error            jsonb,               -- the latest AUTH failure's error (category, message, …)
    last_failure_run_id   text,
    last_failure_seq      int,
    last_failure_step     text,
    last_auth_failure_at  timestamptz,
    last_success_at       timestamptz,
    last_success_run_id   text,
    updated_at            timestamptz,         -- event time of the latest event folded in
    PRIMARY KEY (tenant_id, connector)
);

-- When a late success lands after a failure that is newer still, the degraded period restarts at the
-- first failure after that success: found here rather than kept as a list in the row.
CREATE INDEX run_events_connector_degraded_idx ON run_events (tenant_id, (payload ->> 'connector'), occurred_at)
    WHERE type = 'ConnectorDegraded';
