-- The tenant secrets store (docs/secrets.md): named values steps reference as `{{ secrets.NAME }}`, per tenant
-- and environment. Control-plane state written by the API (a rebuild copies it). `value` is a ciphertext,
-- `enc:v1:<key id>:<AES-256-GCM token>` bound to (tenant, environment, name): never the plaintext, and never
-- returned by the API. `flowtrail secrets rotate-key` re-encrypts it under a new key without changing
-- `last_rotated_at`, which is when the value itself was last written.

CREATE TABLE secrets (
    tenant_id        text NOT NULL REFERENCES tenants (id),
    environment      text NOT NULL CHECK (environment IN ('PRODUCTION', 'TESTING')),
    name             text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]{0,127}$'),
    value            text NOT NULL CHECK (value LIKE 'enc:v1:%'),
    version          int NOT NULL DEFAULT 1,   -- 1 when created, + 1 per rotation (a write of a new value)
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_rotated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, environment, name)
);
