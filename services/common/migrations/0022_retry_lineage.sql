-- Retries you can chain (docs/runs.md): a retry's strategy on its run row, and on each step a retry did not run
-- again the run in which it ran. Both are folded from the ledger (RunRequested.retry_strategy,
-- StepSucceeded.reused_from); rows projected before this migration are filled from their run_events, so the live
-- tables equal a rebuild. The retries of a run are found through runs_retry_of_idx (0014).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS retry_strategy text;
ALTER TABLE run_steps ADD COLUMN IF NOT EXISTS reused_from text;

UPDATE runs r SET retry_strategy = e.payload->>'retry_strategy'
FROM run_events e
WHERE r.retry_of IS NOT NULL AND e.run_id = r.id AND e.seq = 0 AND e.type = 'RunRequested'
  AND e.payload->>'retry_strategy' IS NOT NULL;

UPDATE run_steps s SET reused_from = e.payload->>'reused_from'
FROM runs r JOIN run_events e ON e.run_id = r.id AND e.type = 'StepSucceeded'
WHERE r.retry_of IS NOT NULL AND s.run_id = r.id AND s.step = e.payload->>'step'
  AND e.payload->>'reused_from' IS NOT NULL;
