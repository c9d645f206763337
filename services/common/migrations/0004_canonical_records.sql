-- The canonical data layer (seed 003): records that sync steps wrote, deduplicated by their external
-- ids and served by /api/public/data/{entity}. Derived from RecordsUpserted ledger events.

CREATE TABLE canonical_records (
    tenant_id              text NOT NULL,
    environment            text NOT NULL,
    entity                 text NOT NULL,
    canonical_id           text NOT NULL,
    external_ids           jsonb NOT NULL,
    data                   jsonb NOT NULL,
    last_source_update_at  timestamptz,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    last_run_id            text NOT NULL,
    PRIMARY KEY (tenant_id, environment, entity, canonical_id)
);
-- Incremental pulls: `updated_since` and the cursor walk this index.
CREATE INDEX canonical_records_updated_idx ON canonical_records (tenant_id, environment, entity, updated_at,
                                                                 canonical_id);

-- Every external id (source → id) points at the one canonical record it belongs to.
CREATE TABLE canonical_external_ids (
    tenant_id     text NOT NULL,
    environment   text NOT NULL,
    entity        text NOT NULL,
    source        text NOT NULL,
    external_id   text NOT NULL,
    canonical_id  text NOT NULL,
    PRIMARY KEY (tenant_id, environment, entity, source, external_id)
);
