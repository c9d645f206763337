-- Retention (seed 000): run metadata and payload bodies are kept for separately configurable periods
-- per tenant. The purge job deletes and blanks read-model rows only; the ledger topic keeps every event,
-- so a rebuild stays possible (it re-applies the recorded purge marks below).

ALTER TABLE tenants
    ADD COLUMN retention_days          int NOT NULL DEFAULT 90 CHECK (retention_days > 0),
    ADD COLUMN payload_retention_days  int NOT NULL DEFAULT 7 CHECK (payload_retention_days > 0);

-- What the last purge removed, per tenant: runs created before `runs_before` are gone, payloads of runs
-- created before `payloads_before` are blanked.
CREATE TABLE retention_marks (
    tenant_id        text PRIMARY KEY REFERENCES tenants (id),
    runs_before      timestamptz NOT NULL,
    payloads_before  timestamptz NOT NULL,
    purged_at        timestamptz NOT NULL
);

ALTER TABLE runs ADD COLUMN payloads_purged boolean NOT NULL DEFAULT false;
CREATE INDEX runs_created_idx ON runs (created_at);

-- Runs the purge deleted, with their last seq: a late redelivery of one of their events is then still
-- recognised as a duplicate (run_events, the usual memory, is gone). Pruned a week after the purge.
CREATE TABLE purged_runs (
    run_id     text PRIMARY KEY,
    last_seq   int NOT NULL,
    purged_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX purged_runs_purged_at_idx ON purged_runs (purged_at);
