"""Executor settings: `FLOWTRAIL_EXECUTOR_…` on top of the shared `FLOWTRAIL_…` ones."""

from __future__ import annotations

import socket

from pydantic import Field

from services.common.settings import DEFAULT_EXECUTOR_WEB_PORT, CommonSettings, service_field


class ExecutorSettings(CommonSettings):
    web_host: str = service_field("executor", "web_host", "127.0.0.1")
    web_port: int = service_field("executor", "web_port", DEFAULT_EXECUTOR_WEB_PORT)
    # Local development calls services on loopback; a deployment leaves this off so flows
    # cannot reach internal networks.
    allow_private_networks: bool = service_field("executor", "allow_private_networks", False)
    # 1.0 is real time; tests compress retry backoffs and delays with e.g. 0.01.
    time_scale: float = Field(default=1.0, gt=0, validation_alias="FLOWTRAIL_EXECUTOR_TIME_SCALE")
    default_step_timeout_s: float = service_field("executor", "default_step_timeout_s", 30.0)
    http_max_body_bytes: int = service_field("executor", "http_max_body_bytes", 64 * 1024)
    # 0: an idle producer sends at once; under load records gather while a request is in flight (one per broker
    # at a time), so batches grow with the load (docs/decisions.md, "No producer linger on the hot path").
    producer_linger_ms: int = service_field("executor", "producer_linger_ms", 0, ge=0)
    trigger_batch_size: int = service_field("executor", "trigger_batch_size", 500)
    # A killed executor's partitions move to a live one after this long without heartbeats; restarted with the same
    # instance id, it takes them back at once, without waiting for it (docs/decisions.md, static membership).
    session_timeout_s: float = service_field("executor", "session_timeout_s", 10.0)
    # This replica's stable name in the consumer group (Kafka's group.instance.id): the same across its restarts,
    # different from every other replica's. Empty: `<hostname>-<web_port>` (a pod's name under Kubernetes).
    instance_id: str = service_field("executor", "instance_id", "")
    # Each owned partition's snapshot is rewritten this often once its ledger has `snapshot_min_events` new records
    # past the last one: a restart replays only what follows it (docs/architecture.md, Recovery).
    snapshot_interval_s: float = service_field("executor", "snapshot_interval_s", 60.0, gt=0)
    snapshot_min_events: int = service_field("executor", "snapshot_min_events", 10_000, ge=1)

    @property
    def group_instance_id(self) -> str:
        return self.instance_id or f"{socket.gethostname()}-{self.web_port}"

    # Named connections for database_query and kafka_* steps, as JSON: {"orders": "postgresql://…",
    # "events": "kafka://host:9092,host2:9092"}. Steps name them, so flows never hold the credentials.
    connectors: dict[str, str] = service_field("executor", "connectors", {})
    # Step outputs past this many bytes of JSON are cut, with `truncated: true` (rows, messages) or a marker.
    step_output_max_bytes: int = service_field("executor", "step_output_max_bytes", 256 * 1024)
    db_max_rows: int = service_field("executor", "db_max_rows", 1000)
    # Per-tenant quota of active (RUNNING or PAUSED) runs: a run that would exceed it ends QUOTA_EXCEEDED.
    # `tenant_max_active_runs` applies to every tenant, `tenant_quotas` ({"acme": 50}) overrides it per tenant.
    # Counted over every executor by the shared admission in PostgreSQL (docs/architecture.md, Admission).
    tenant_max_active_runs: int | None = service_field("executor", "tenant_max_active_runs", None)
    tenant_quotas: dict[str, int] = service_field("executor", "tenant_quotas", {})
