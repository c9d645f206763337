-- Run actions (seed 001): "which bulk operation made or touched this run" and "the retries of this run"
-- are queries, answered from an index each (partial: most runs have neither).
CREATE INDEX IF NOT EXISTS runs_bulk_operation_idx ON runs (tenant_id, bulk_operation_id)
    WHERE bulk_operation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_retry_of_idx ON runs (retry_of) WHERE retry_of IS NOT NULL;
