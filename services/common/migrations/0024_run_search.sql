-- `q` on GET /v1/runs reaches the errors users see (docs/runs.md "Searching runs"): besides the run id and its
-- error message, the text of every record error of the run (RecordFailed: message and the destination's raw error)
-- and the upstream's answer to a failed step (StepFailed: the body of an http_request's response, a sync's raw
-- error), bounded per run. runs.search_details holds that text; it is derived from the run's ledger events only,
-- in SQL, from the payloads in run_events: the projector appends the pieces of each batch's new events in seq order
-- with search_fold (services/projector/adapters/search.py), and the same functions fill it here and after a payload
-- purge — so the text is the same whatever the batch boundaries, in a rebuild and after this upgrade.

-- The searchable text of a JSON value, at most `budget` characters: strings as they are, numbers and booleans as
-- JSON, object members as `key: value`, all joined by spaces in jsonb's own order (so live and backfill agree).
CREATE OR REPLACE FUNCTION search_json_text(j jsonb, budget int) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    acc text := '';
    part text;
    k text;
    v jsonb;
BEGIN
    IF j IS NULL OR budget <= 0 THEN
        RETURN NULL;
    END IF;
    CASE jsonb_typeof(j)
        WHEN 'null' THEN
            RETURN NULL;
        WHEN 'string' THEN
            RETURN left(j #>> '{}', budget);
        WHEN 'object' THEN
            FOR k, v IN SELECT e.key, e.value FROM jsonb_each(j) AS e LOOP
                EXIT WHEN length(acc) >= budget;
                part := search_json_text(v, budget - length(acc));
                part := CASE WHEN part IS NULL OR part = '' THEN k ELSE k || ': ' || part END;
                acc := CASE WHEN acc = '' THEN part ELSE acc || ' ' || part END;
            END LOOP;
        WHEN 'array' THEN
            FOR v IN SELECT e.value FROM jsonb_array_elements(j) AS e LOOP
                EXIT WHEN length(acc) >= budget;
                part := search_json_text(v, budget - length(acc));
                CONTINUE WHEN part IS NULL OR part = '';
                acc := CASE WHEN acc = '' THEN part ELSE acc || ' ' || part END;
            END LOOP;
        ELSE
            RETURN left(j::text, budget);
    END CASE;
    RETURN NULLIF(left(acc, budget), '');
END
$$;

-- What one ledger event adds to its run's search text, in order; NULLs add nothing. Whitespace runs become one
-- space (a q with single spaces finds text that had newlines). Only these two event types carry pieces:
-- services/projector/adapters/search.py SEARCHED_TYPES names the same.
CREATE OR REPLACE FUNCTION search_pieces(kind text, payload jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY(
        SELECT btrim(regexp_replace(x.piece, '\s+', ' ', 'g'))
        FROM unnest(CASE kind
            WHEN 'RecordFailed' THEN ARRAY[
                left(payload->>'error', 500),
                search_json_text(payload->'raw_error', 1000)]
            WHEN 'StepFailed' THEN ARRAY[
                search_json_text(payload->'output'->'body', 1500),
                search_json_text(payload->'error'->'details'->'raw_error', 1000)]
            ELSE '{}'::text[]
        END) WITH ORDINALITY AS x(piece, n)
        WHERE x.piece IS NOT NULL
        ORDER BY x.n
    )
$$;

-- Appends pieces to a run's search text in order: a piece already in the text adds nothing (a thousand records
-- refused for one reason cost that reason once), and the text stops at 4,096 characters. A left fold, so
-- search_fold(search_fold(s, a), b) = search_fold(s, a || b): batch boundaries do not show.
CREATE OR REPLACE FUNCTION search_fold(current text, pieces text[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    s text := coalesce(current, '');
    p text;
BEGIN
    FOREACH p IN ARRAY coalesce(pieces, '{}'::text[]) LOOP
        EXIT WHEN length(s) >= 4096;
        CONTINUE WHEN p IS NULL OR p = '' OR strpos(s, p) > 0;
        s := left(CASE WHEN s = '' THEN p ELSE s || E'\n' || p END, 4096);
    END LOOP;
    RETURN NULLIF(s, '');
END
$$;

ALTER TABLE runs ADD COLUMN IF NOT EXISTS search_details text;

-- Runs projected before this migration: their text from their events, as the projector would have folded it.
UPDATE runs r SET search_details = x.text
FROM (
    SELECT e.run_id, search_fold(NULL, array_agg(p.piece ORDER BY e.seq, p.n)) AS text
    FROM run_events e
    CROSS JOIN LATERAL unnest(search_pieces(e.type, e.payload)) WITH ORDINALITY AS p(piece, n)
    WHERE e.type IN ('RecordFailed', 'StepFailed')
    GROUP BY e.run_id
) x
WHERE r.id = x.run_id AND x.text IS NOT NULL;

-- One trigram index over everything q matches (services/api/adapters/runs.py SEARCH_TEXT is this expression, to
-- the character): it replaces the two it covers, on error_message (0002) and lower(id) (0006).
DROP INDEX IF EXISTS runs_error_trgm_idx;
DROP INDEX IF EXISTS runs_id_search_idx;
CREATE INDEX IF NOT EXISTS runs_search_idx ON runs USING gin (
    (id || E'\n' || coalesce(error_message, '') || E'\n' || coalesce(search_details, '')) public.gin_trgm_ops
);
