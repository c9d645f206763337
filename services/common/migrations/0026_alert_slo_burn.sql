-- Alert rules of kind slo_burn (docs/alerts.md): an objective with multi-window, multi-burn-rate paging. Its
-- settings live in params like every kind's; only the kind's check widens.
ALTER TABLE alert_rules DROP CONSTRAINT IF EXISTS alert_rules_kind_check;
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_kind_check
    CHECK (kind IN ('failed_run', 'consecutive_partial', 'no_success', 'failure_rate', 'slo_burn'));
