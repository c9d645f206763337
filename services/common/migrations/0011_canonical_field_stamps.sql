-- Per-field "newest wins" keys for canonical records: merging updates field by field with these makes
-- the result independent of the order updates arrive in (partitions interleave differently on a replay).
ALTER TABLE canonical_records ADD COLUMN field_stamps jsonb NOT NULL DEFAULT '{}';
