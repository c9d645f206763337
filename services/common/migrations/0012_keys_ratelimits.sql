-- API key lifecycle (rotation with a grace period) and per-key rate limits (seed 003).

-- A rotated key names its replacement and keeps working until its expires_at, the end of the grace period.
ALTER TABLE api_keys
    ADD COLUMN rotated_at   timestamptz,
    ADD COLUMN replaced_by  text;
CREATE INDEX api_keys_tenant_created_idx ON api_keys (tenant_id, created_at DESC);

-- Sliding-window counters, one row per (key, class): the requests admitted in the current fixed window
-- and in the one before it; the estimate weights the previous window by how much of it still overlaps the
-- sliding one. The row rolls over in place, so nothing accumulates and nothing needs cleaning. Every API
-- and ingest process updates the same row, so a key has one budget however many processes serve it.
-- UNLOGGED: losing the counters in a crash only forgives a minute of traffic, and writes skip the WAL.
CREATE UNLOGGED TABLE rate_limit_windows (
    key_id        text NOT NULL,
    class         text NOT NULL CHECK (class IN ('reads', 'writes', 'triggers')),
    window_start  bigint NOT NULL,             -- unix seconds, a multiple of the window length
    current       int NOT NULL,                -- admitted in [window_start, window_start + length)
    previous      int NOT NULL,                -- admitted in the window before
    at            double precision NOT NULL,   -- unix time of the latest request (database clock)
    admitted      boolean NOT NULL,            -- whether the latest request was admitted
    PRIMARY KEY (key_id, class)
);
