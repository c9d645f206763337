"""Alert channel facts the API (validating a rule) and the projector (delivering an alert) share."""

# PagerDuty Events API v2: where a `pagerduty` channel without its own URL sends (routing key in the body).
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
