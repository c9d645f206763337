-- `q` on GET /v1/runs reaches the errors users see (docs/runs.md "Searching runs"): besides the run id and its
-- error message, the text of every record error of the run (RecordFailed: message and the destination's raw error)
-- and the upstream's answer to a failed step (StepFailed: the body of an http_request's response, a sync's raw
-- error), bounded per run. runs.search_details holds that text; it is derived from the run's ledger events only,
-- in SQL, from the payloads in run_events: the projector appends the pieces of each batch's new events in seq order
-- with search_fold (services/projector/adapters/search.py), and the same functions fill it here and after a payload
-- purge — so the text is the same whatever the batch boundaries, in a rebuild and after this upgrade.

-- The searchable text of a JSON value, at most `budget` characters: a string as it is; anything else as its JSON
-- text without quotes and brackets, with its escapes undone (`{"error": "invalid_token"}` → `error: invalid_token`),
-- members in jsonb's own order (so live and backfill agree). String functions only, no regular expression or walk of
-- the value: this runs for every record error the projector sees.
CREATE OR REPLACE FUNCTION search_json_text(j jsonb, budget int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(j)
        WHEN 'null' THEN NULL
        WHEN 'string' THEN left(j #>> '{}', budget)
        ELSE left(translate(replace(replace(replace(replace(left(j::text, 2 * budget),
                                    '\"', ''), '\n', ' '), '\t', ' '), '\\', '\'), '[]{}"', ''), budget)
    END
$$;

-- A piece as it is searched: line breaks and tabs as spaces, runs of spaces as one, trimmed (a q with single spaces
-- finds text that had newlines); NULL when nothing is left.
CREATE OR REPLACE FUNCTION search_clean(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT NULLIF(CASE WHEN strpos(btrim(translate(t, E'\n\r\t', '   ')), '  ') > 0
                       THEN regexp_replace(btrim(translate(t, E'\n\r\t', '   ')), ' {2,}', ' ', 'g')
                       ELSE btrim(translate(t, E'\n\r\t', '   ')) END, '')
$$;

-- What one ledger event adds to its run's search text, in order; NULL elements add nothing. Only these two event
-- types carry pieces: services/projector/adapters/search.py SEARCHED_TYPES names the same.
CREATE OR REPLACE FUNCTION search_pieces(kind text, payload jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE kind
        WHEN 'RecordFailed' THEN ARRAY[
            search_clean(left(payload->>'error', 500)),
            search_clean(search_json_text(payload->'raw_error', 1000))]
        WHEN 'StepFailed' THEN ARRAY[
            search_clean(search_json_text(payload->'output'->'body', 1500)),
            search_clean(search_json_text(payload->'error'->'details'->'raw_error', 1000))]
        ELSE '{}'::text[]
    END
$$;

-- Appends the pieces of events (in seq order; each `{"type": …, "payload": …}`) to a run's search text: a piece
-- already in the text adds nothing (a thousand records refused for one reason cost that reason once), and the text
-- stops at 4,096 characters — the events after that are not even read. A left fold, so
-- search_fold(search_fold(s, a), b) = search_fold(s, a || b): batch boundaries do not show.
CREATE OR REPLACE FUNCTION search_fold(current text, events jsonb[]) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    s text := coalesce(current, '');
    e jsonb;
    p text;
BEGIN
    FOREACH e IN ARRAY coalesce(events, '{}'::jsonb[]) LOOP
        EXIT WHEN length(s) >= 4096;
        FOREACH p IN ARRAY search_pieces(e->>'type', e->'payload') LOOP
            EXIT WHEN length(s) >= 4096;
            CONTINUE WHEN p IS NULL OR strpos(s, p) > 0;
            s := left(CASE WHEN s = '' THEN p ELSE s || E'\n' || p END, 4096);
        END LOOP;
    END LOOP;
    RETURN NULLIF(s, '');
END
$$;

ALTER TABLE runs ADD COLUMN IF NOT EXISTS search_details text;

-- Runs projected before this migration: their text from their events, as the projector would have folded it.
UPDATE runs r SET search_details = x.text
FROM (
    SELECT run_id, search_fold(NULL, array_agg(jsonb_build_object('type', type, 'payload', payload) ORDER BY seq)) AS text
    FROM run_events
    WHERE type IN ('RecordFailed', 'StepFailed')
    GROUP BY run_id
) x
WHERE r.id = x.run_id AND x.text IS NOT NULL;

-- One trigram index over everything q matches (services/api/adapters/runs.py SEARCH_TEXT is this expression, to
-- the character): it replaces the two it covers, on error_message (0002) and lower(id) (0006).
DROP INDEX IF EXISTS runs_error_trgm_idx;
DROP INDEX IF EXISTS runs_id_search_idx;
CREATE INDEX IF NOT EXISTS runs_search_idx ON runs USING gin (
    (id || E'\n' || coalesce(error_message, '') || E'\n' || coalesce(search_details, '')) public.gin_trgm_ops
);
