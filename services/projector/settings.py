"""Projector settings: `FLOWTRAIL_PROJECTOR_…` on top of the shared `FLOWTRAIL_…` ones."""

from __future__ import annotations

import socket

from services.common.settings import DEFAULT_PROJECTOR_METRICS_PORT, CommonSettings, service_field


class ProjectorSettings(CommonSettings):
    http_host: str = service_field("projector", "http_host", "127.0.0.1")
    http_port: int = service_field("projector", "http_port", DEFAULT_PROJECTOR_METRICS_PORT)
    # Many events per transaction: one fetch of up to this many records becomes one transaction.
    batch_max_records: int = service_field("projector", "batch_max_records", 5000)
    batch_wait_ms: int = service_field("projector", "batch_wait_ms", 20)
    # Whether a batch's commit waits for its WAL to reach disk. Off: a commit answers at once (under load the
    # flush took most of a small batch's time), and a PostgreSQL crash may lose the last batches' rows and offsets
    # together; the projector then goes on from the offsets PostgreSQL kept, so it projects those events again.
    synchronous_commit: bool = service_field("projector", "synchronous_commit", False)
    # How often the retention purge runs (0 turns it off); the periods themselves are per tenant.
    retention_interval_s: float = service_field("projector", "retention_interval_s", 3600.0)
    # Webhooks: how often due deliveries are looked for, the first retry delay (doubling, at most an
    # hour), and whether receivers on private networks are allowed (local development only).
    webhook_poll_s: float = service_field("projector", "webhook_poll_s", 0.5)
    webhook_backoff_s: float = service_field("projector", "webhook_backoff_s", 10.0)
    webhook_allow_private_networks: bool = service_field("projector", "webhook_allow_private_networks", False)
    # Alerts: how often due deliveries are looked for and the first retry delay (doubling, at most an hour,
    # for 24 hours; webhook, Slack and PagerDuty URLs obey the private-network setting above), and how often
    # the no_success clock looks for silent flows (0 turns the clock off).
    alert_poll_s: float = service_field("projector", "alert_poll_s", 0.5)
    alert_backoff_s: float = service_field("projector", "alert_backoff_s", 10.0)
    alert_clock_s: float = service_field("projector", "alert_clock_s", 15.0)
    # Email alerts go through this SMTP server; an empty host leaves email deliveries failing with that reason.
    smtp_host: str = service_field("projector", "smtp_host", "")
    smtp_port: int = service_field("projector", "smtp_port", 25)
    smtp_from: str = service_field("projector", "smtp_from", "flowtrail@localhost")
    smtp_starttls: bool = service_field("projector", "smtp_starttls", False)
    smtp_username: str = service_field("projector", "smtp_username", "")
    smtp_password: str = service_field("projector", "smtp_password", "")
    smtp_timeout_s: float = service_field("projector", "smtp_timeout_s", 10.0)
    # On-call (docs/alerts.md): runs failing with an INTERNAL error (Flowtrail's own bug) page this webhook, once per
    # error fingerprint per window; empty: nobody is paged. It obeys the private-network setting above.
    oncall_webhook_url: str = service_field("projector", "oncall_webhook_url", "")
    oncall_window_s: float = service_field("projector", "oncall_window_s", 3600.0, gt=0)

    # This replica's stable name in the consumer group (Kafka's group.instance.id): a projector restarted after a
    # kill rejoins as itself and gets its partitions back without waiting out its old session (docs/decisions.md).
    # Empty: `<hostname>-<http_port>`.
    instance_id: str = service_field("projector", "instance_id", "")

    @property
    def group_instance_id(self) -> str:
        return self.instance_id or f"{socket.gethostname()}-{self.http_port}"

    @property
    def consumer_group(self) -> str:
        return f"{self.topic_prefix}-projector"
