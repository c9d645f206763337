-- Blocks of rate-limit budget a busy process reserves in one upsert and admits from locally
-- (services/common/ratelimit.py, docs/api-contract.md#rate-limits): the slots reserved beyond the requests
-- that asked, not yet given back or confirmed used, and when the last such block's lease ends (database clock).
-- A request refused while some are outstanding waits for them to come back, at most until lent_until.
ALTER TABLE rate_limit_windows
    ADD COLUMN lent       int NOT NULL DEFAULT 0,
    ADD COLUMN lent_until double precision NOT NULL DEFAULT 0;
-- How many of the latest upsert's requested slots it granted (admitted is whether it granted any).
ALTER TABLE rate_limit_windows ADD COLUMN granted int NOT NULL DEFAULT 0;
