-- On-call pages for runs that failed with an INTERNAL error (docs/alerts.md): one row per page sent to the
-- deployment's on-call webhook, at most one per error fingerprint per window. A record of what was sent
-- (control plane, carried over by a rebuild as is) and the outbox the alert dispatcher sends from.
CREATE TABLE oncall_pages (
    id               text PRIMARY KEY,
    fingerprint      text NOT NULL,
    at               timestamptz NOT NULL,           -- when the run failed (event time): windows count from it
    run_id           text NOT NULL,
    tenant_id        text NOT NULL,
    flow_id          text NOT NULL,
    target           text NOT NULL,
    body             jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    first_attempt_at timestamptz,
    last_status_code int,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
CREATE INDEX oncall_pages_fingerprint_idx ON oncall_pages (fingerprint, at DESC);
CREATE INDEX oncall_pages_due_idx ON oncall_pages (next_attempt_at) WHERE status = 'pending';
