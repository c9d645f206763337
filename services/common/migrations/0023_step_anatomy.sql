-- Honest step anatomy (docs/runs.md "Step anatomy"): why a skipped step did not run (run_steps.reason, from
-- StepSkipped.reason), what every attempt answered (step_attempts.output, from StepAttemptFailed / StepSucceeded /
-- StepFailed .output), and an INFO log line for every step start, success and skip, derived by the projector from
-- those events at their seq (services/projector/details.py step_log), not written to the ledger.
-- Rows projected before this migration are filled from their run_events, so the live tables equal a rebuild; the
-- log messages below are step_log's, in SQL: change both together (tests/integration/test_step_logs.py).
ALTER TABLE run_steps ADD COLUMN IF NOT EXISTS reason text;
ALTER TABLE step_attempts ADD COLUMN IF NOT EXISTS output jsonb;

UPDATE run_steps s SET reason = NULLIF(e.payload->>'reason', '')
FROM run_events e
WHERE s.status = 'SKIPPED' AND s.reason IS NULL
  AND e.run_id = s.run_id AND e.type = 'StepSkipped' AND e.payload->>'step' = s.step;

UPDATE step_attempts a SET output = e.payload->'output'
FROM run_events e
WHERE a.output IS NULL
  AND e.run_id = a.run_id AND e.type IN ('StepAttemptFailed', 'StepSucceeded', 'StepFailed')
  AND e.payload->>'step' = a.step AND (e.payload->>'attempt')::int = a.attempt
  AND jsonb_typeof(e.payload->'output') <> 'null';

INSERT INTO run_logs (run_id, seq, tenant_id, level, step, message, fields, occurred_at)
SELECT e.run_id, e.seq, e.tenant_id, 'INFO', e.payload->>'step',
       CASE
           WHEN e.type = 'StepStarted' THEN
               format('step %s started (%s, attempt %s)', e.payload->>'step', e.payload->>'action',
                      e.payload->>'attempt')
           WHEN e.type = 'StepSucceeded' AND jsonb_typeof(e.payload->'reused_from') = 'string' THEN
               format('step %s reused from run %s, not run again', e.payload->>'step', e.payload->>'reused_from')
           WHEN e.type = 'StepSucceeded' THEN
               format('step %s succeeded in %s ms (attempt %s)', e.payload->>'step',
                      trunc((e.payload->>'duration_ms')::float8)::bigint, e.payload->>'attempt')
           ELSE
               format('step %s skipped: %s', e.payload->>'step',
                      COALESCE(NULLIF(e.payload->>'reason', ''), 'its run_condition was false'))
       END,
       CASE
           WHEN e.type = 'StepStarted' THEN
               jsonb_build_object('attempt', e.payload->'attempt', 'action', e.payload->'action')
           WHEN e.type = 'StepSucceeded' AND jsonb_typeof(e.payload->'reused_from') = 'string' THEN
               jsonb_build_object('attempt', e.payload->'attempt', 'reused_from', e.payload->'reused_from')
           WHEN e.type = 'StepSucceeded' THEN
               jsonb_build_object('attempt', e.payload->'attempt', 'duration_ms', e.payload->'duration_ms')
           ELSE jsonb_build_object('reason', e.payload->'reason')
       END,
       e.occurred_at
FROM run_events e
WHERE e.type IN ('StepStarted', 'StepSucceeded', 'StepSkipped')
ON CONFLICT DO NOTHING;
