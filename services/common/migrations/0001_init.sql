-- Flowtrail read models and control plane, first version. Applied by services.common.migrate.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored only as a SHA-256 hash; `prefix` (the first characters after ft_live_/ft_test_)
-- finds the row, the hash is compared in constant time.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants (id),
    name         text NOT NULL DEFAULT '',
    prefix       text NOT NULL UNIQUE,
    key_hash     bytea NOT NULL,
    environment  text NOT NULL CHECK (environment IN ('PRODUCTION', 'TESTING')),
    scopes       text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE flows (
    tenant_id       text NOT NULL,
    id              text NOT NULL,
    name            text NOT NULL,
    description     text NOT NULL DEFAULT '',
    latest_version  int NOT NULL,
    status          text NOT NULL DEFAULT 'active',
    environment     text NOT NULL,
    trigger_type    text NOT NULL,
    tags            text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE flow_versions (
    tenant_id     text NOT NULL,
    flow_id       text NOT NULL,
    version       int NOT NULL,
    definition    jsonb NOT NULL,
    published_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, flow_id, version)
);

CREATE TABLE runs (
    id                 text PRIMARY KEY,
    tenant_id          text NOT NULL,
    flow_id            text NOT NULL,
    flow_version       int NOT NULL,
    flow_name          text NOT NULL DEFAULT '',
    status             text NOT NULL,
    environment        text NOT NULL,
    execution_mode     text NOT NULL,
    trigger_type       text NOT NULL,
    caller             text,
    trigger_payload    jsonb,
    tags               text[] NOT NULL DEFAULT '{}',
    parent_run_id      text,
    retry_of           text,
    bulk_operation_id  text,
    failed_step        text,
    error              jsonb,
    error_message      text,
    steps_count        int NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL,
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL,
    duration_ms        double precision,
    last_seq           int NOT NULL,
    archived           boolean NOT NULL DEFAULT false
);
-- Keyset pagination: newest first within a tenant, optionally within a flow or a status.
CREATE INDEX runs_tenant_created_idx ON runs (tenant_id, created_at DESC, id DESC);
CREATE INDEX runs_tenant_flow_created_idx ON runs (tenant_id, flow_id, created_at DESC, id DESC);
CREATE INDEX runs_tenant_status_created_idx ON runs (tenant_id, status, created_at DESC, id DESC);

CREATE TABLE run_steps (
    run_id       text NOT NULL,
    step         text NOT NULL,
    position     int NOT NULL,
    action       text,
    status       text NOT NULL,
    attempt      int NOT NULL DEFAULT 1,
    input        jsonb,
    output       jsonb,
    error        jsonb,
    assertions   jsonb,
    extractions  jsonb,
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_ms  double precision,
    PRIMARY KEY (run_id, step)
);

-- The per-run copy of the ledger; (run_id, seq) is how the projector drops duplicates.
CREATE TABLE run_events (
    run_id           text NOT NULL,
    seq              int NOT NULL,
    event_id         text NOT NULL,
    type             text NOT NULL,
    tenant_id        text NOT NULL,
    occurred_at      timestamptz NOT NULL,
    causation_id     text NOT NULL,
    payload          jsonb NOT NULL,
    kafka_partition  int NOT NULL,
    kafka_offset     bigint NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Where each projector consumer group is in each topic partition; written in the same
-- transaction as the rows it covers (DESIGN 2.3).
CREATE TABLE projector_offsets (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    partition       int NOT NULL,
    next_offset     bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
