-- Alerts (seed 000): rules per flow, their state and history, and the delivery of each alert to its channels.
-- alert_rules and alert_deliveries are control-plane (written by the API / a record of what was sent);
-- alert_state and alert_events are derived from the ledger by the projector, in the batch that projects the
-- runs, so a rebuild replays every rule over past runs and reproduces the same history. No column of a
-- derived table defaults to now(): a replay must write the same rows. No foreign keys from derived tables
-- to rules either: a rebuild's swap empties and refills the control tables under the derived ones.

CREATE TABLE alert_rules (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    name        text NOT NULL,
    flow_id     text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('failed_run', 'consecutive_partial', 'no_success', 'failure_rate')),
    params      jsonb NOT NULL,                -- n | minutes | threshold, window_minutes, min_runs
    channels    jsonb NOT NULL DEFAULT '[]',   -- [{type: webhook|slack|pagerduty|email, url | routing_key | to}]
    enabled     boolean NOT NULL DEFAULT true,
    -- Every change of params or enabled, with when it took effect: a run is judged by the revision in force
    -- when it finished, so editing a rule does not rewrite the history a rebuild derives.
    revisions   jsonb NOT NULL,
    secret      text NOT NULL,                 -- signs generic webhook deliveries
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX alert_rules_flow_idx ON alert_rules (tenant_id, flow_id);

CREATE TABLE alert_state (
    rule_id             text PRIMARY KEY,
    consecutive         int NOT NULL DEFAULT 0,        -- consecutive PARTIAL runs
    last_success_at     timestamptz,
    last_success_run_id text,
    open                boolean NOT NULL DEFAULT false,
    "window"            jsonb NOT NULL DEFAULT '[]',   -- failure_rate: [[finished_at, failed], …] inside the window
    updated_at          timestamptz                    -- event time of the last run folded in
);

CREATE TABLE alert_events (
    id                 text PRIMARY KEY,
    tenant_id          text NOT NULL,
    environment        text NOT NULL,
    rule_id            text NOT NULL,
    flow_id            text NOT NULL,
    kind               text NOT NULL,
    run_id             text,
    fired_at           timestamptz NOT NULL,
    reason             text NOT NULL,
    payload            jsonb NOT NULL,
    resolved_at        timestamptz,
    resolved_by_run_id text
);
CREATE INDEX alert_events_tenant_idx ON alert_events (tenant_id, environment, fired_at DESC, id DESC);
CREATE INDEX alert_events_rule_idx ON alert_events (rule_id, fired_at DESC);
CREATE INDEX alert_events_open_idx ON alert_events (rule_id) WHERE resolved_at IS NULL;

CREATE TABLE alert_deliveries (
    id               text PRIMARY KEY,
    alert_id         text NOT NULL,
    rule_id          text NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    tenant_id        text NOT NULL,
    action           text NOT NULL CHECK (action IN ('trigger', 'resolve')),
    channel_index    int NOT NULL,
    channel_type     text NOT NULL,
    target           text NOT NULL,                 -- URL or the email recipients
    body             jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         int NOT NULL DEFAULT 0,
    attempt_log      jsonb NOT NULL DEFAULT '[]',   -- [{attempt, at, status_code, error, duration_ms}]
    next_attempt_at  timestamptz NOT NULL,
    first_attempt_at timestamptz,
    last_status_code int,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (alert_id, action, channel_index)
);
CREATE INDEX alert_deliveries_due_idx ON alert_deliveries (next_attempt_at) WHERE status = 'pending';
