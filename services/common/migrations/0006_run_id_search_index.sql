-- pg_trgm (1.6+) also serves `=`, so the planner took the trigram index on `id` for `id = ANY(...)`
-- lookups: a bitmap scan per value instead of the primary key, hundreds of ms per projector batch.
-- Search run ids through an expression index that plain equality never matches.
DROP INDEX runs_id_trgm_idx;
CREATE INDEX runs_id_search_idx ON runs USING gin (lower(id) public.gin_trgm_ops);
