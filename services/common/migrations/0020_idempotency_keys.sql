-- Idempotency keys (Stripe's semantics): the first request with a key runs; the same key with the same request
-- within 24 h answers the stored result and changes nothing; the same key with another request is refused.
-- One row per (tenant, environment, key), shared by every ingest and API process, so a retry that reaches
-- another replica or a restarted one is still recognised.
CREATE TABLE idempotency_keys (
    tenant_id    text NOT NULL,
    environment  text NOT NULL,
    key          text NOT NULL,
    fingerprint  bytea NOT NULL,             -- SHA-256 of method, path, query and body
    method       text NOT NULL,
    path         text NOT NULL,
    state        text NOT NULL CHECK (state IN ('running', 'done')),
    lease_until  timestamptz NOT NULL,       -- a running request abandoned past this (its process died) is taken over
    status       int,
    headers      jsonb,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, environment, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
