-- Read models of DESIGN 6 beyond the run summary: attempts, logs, record errors, failure groups,
-- analytics rollups, endpoint coverage, and the indexes behind the runs filters and `q` search.

-- pg_trgm makes `q` (substring of an error message or run id) an index scan. One database-wide
-- extension shared by every schema; the lock keeps concurrent migrators from racing to create it.
SELECT pg_advisory_xact_lock(hashtext('flowtrail-extensions'));
CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public;

ALTER TABLE runs
    ADD COLUMN error_category       text,
    ADD COLUMN error_fingerprint    text,
    ADD COLUMN records_read         int NOT NULL DEFAULT 0,
    ADD COLUMN records_transformed  int NOT NULL DEFAULT 0,
    ADD COLUMN records_written      int NOT NULL DEFAULT 0,
    ADD COLUMN records_deduped      int NOT NULL DEFAULT 0,
    ADD COLUMN records_skipped      int NOT NULL DEFAULT 0,
    ADD COLUMN records_failed       int NOT NULL DEFAULT 0;

CREATE INDEX runs_error_trgm_idx ON runs USING gin (error_message public.gin_trgm_ops);
CREATE INDEX runs_id_trgm_idx ON runs USING gin (id public.gin_trgm_ops);
CREATE INDEX runs_tenant_failed_step_idx ON runs (tenant_id, failed_step, created_at DESC, id DESC)
    WHERE failed_step IS NOT NULL;
CREATE INDEX runs_tenant_fingerprint_idx ON runs (tenant_id, error_fingerprint, created_at DESC)
    WHERE error_fingerprint IS NOT NULL;
CREATE INDEX runs_tags_idx ON runs USING gin (tags);
CREATE INDEX runs_tenant_updated_idx ON runs (tenant_id, updated_at DESC, id DESC);

-- One row per attempt of a step: its error and when the next attempt is due.
CREATE TABLE step_attempts (
    run_id       text NOT NULL,
    step         text NOT NULL,
    attempt      int NOT NULL,
    status       text NOT NULL,
    input        jsonb,
    error        jsonb,
    retry_at     timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_ms  double precision,
    PRIMARY KEY (run_id, step, attempt)
);

CREATE TABLE run_logs (
    run_id       text NOT NULL,
    seq          int NOT NULL,
    tenant_id    text NOT NULL,
    level        text NOT NULL,
    step         text,
    message      text NOT NULL,
    fields       jsonb NOT NULL DEFAULT '{}',
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE record_errors (
    run_id       text NOT NULL,
    seq          int NOT NULL,
    tenant_id    text NOT NULL,
    step         text NOT NULL,
    record_key   text NOT NULL,
    field_path   text,
    error        text NOT NULL,
    raw_error    jsonb,
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Errors fingerprinted by normalised message, step and category (seed 004 failure analysis).
CREATE TABLE failure_groups (
    tenant_id       text NOT NULL,
    environment     text NOT NULL,
    fingerprint     text NOT NULL,
    flow_id         text NOT NULL,
    step            text,
    category        text NOT NULL,
    message_pattern text NOT NULL,
    sample_message  text NOT NULL,
    runs            int NOT NULL,
    first_seen      timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    last_run_id     text NOT NULL,
    PRIMARY KEY (tenant_id, environment, fingerprint)
);

-- Finished runs per flow, hour of creation, status and trigger type: pass rate and volume charts.
CREATE TABLE flow_hourly (
    tenant_id        text NOT NULL,
    flow_id          text NOT NULL,
    environment      text NOT NULL,
    hour             timestamptz NOT NULL,
    status           text NOT NULL,
    trigger_type     text NOT NULL,
    runs             int NOT NULL,
    -- numeric, not float: sums must not depend on how runs were batched, or rebuilds would not compare equal.
    duration_ms_sum  numeric NOT NULL,
    records_written  bigint NOT NULL,
    records_failed   bigint NOT NULL,
    PRIMARY KEY (tenant_id, flow_id, environment, hour, status, trigger_type)
);

-- Step outcomes per flow version: a step that both passes and fails on one version is flaky.
CREATE TABLE step_outcomes (
    tenant_id     text NOT NULL,
    environment   text NOT NULL,
    flow_id       text NOT NULL,
    flow_version  int NOT NULL,
    step          text NOT NULL,
    succeeded     int NOT NULL,
    failed        int NOT NULL,
    retried       int NOT NULL,
    last_failed_at timestamptz,
    PRIMARY KEY (tenant_id, environment, flow_id, flow_version, step)
);

-- Hosts and routes that http_request steps exercised.
CREATE TABLE endpoint_coverage (
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    flow_id     text NOT NULL,
    method      text NOT NULL,
    host        text NOT NULL,
    route       text NOT NULL,
    calls       int NOT NULL,
    last_seen   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, environment, flow_id, method, host, route)
);
