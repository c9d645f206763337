-- The cursor window a syncing run read (RunStarted.cursor_window), shown on the run (seed 000).
ALTER TABLE runs ADD COLUMN cursor_window jsonb;
