"""API settings: `FLOWTRAIL_API_…` on top of the shared `FLOWTRAIL_…` ones."""

from __future__ import annotations

from pydantic import Field, SecretStr

from services.common.settings import DEFAULT_API_PORT, DEFAULT_INGEST_PORT, CommonSettings, service_field


class ApiSettings(CommonSettings):
    host: str = service_field("api", "host", "127.0.0.1")
    port: int = service_field("api", "port", DEFAULT_API_PORT)
    pool_max_size: int = service_field("api", "pool_max_size", 10)
    # A request body larger than this is refused with 413 before it is read (a flow definition is one Kafka
    # message, so it must also fit FLOWTRAIL_KAFKA_MAX_MESSAGE_BYTES).
    max_body_bytes: int = service_field("api", "max_body_bytes", 1024 * 1024, ge=1024)
    # Triggers at the API's base URL (`POST /v1/flows/{id}/trigger`, `/v1/actions/{name}/async|live`) take the
    # bodies, inputs and waits ingest takes (docs/intake.md), under these.
    max_trigger_body_bytes: int = service_field("api", "max_trigger_body_bytes", 64 * 1024 * 1024, ge=1024)
    max_batch_inputs: int = service_field("api", "max_batch_inputs", 100_000)
    max_input_bytes: int = service_field("api", "max_input_bytes", 512 * 1024, ge=1024)
    live_timeout_s: float = service_field("api", "live_timeout_s", 30.0)
    # Webhook receivers on private or loopback addresses: local development only.
    webhook_allow_private_networks: bool = service_field("api", "webhook_allow_private_networks", False)
    # Connectors (their URLs and DSNs, and the checks `verify` makes) on private or loopback addresses.
    connector_allow_private_networks: bool = service_field("api", "connector_allow_private_networks", False)
    # Per-key sliding-window rate limits (docs/api-contract.md): requests per window, shared by every process serving a
    # key through PostgreSQL. Reads are GET/HEAD, triggers POST /v1/flows/{id}/trigger, writes the rest.
    rate_limit_enabled: bool = service_field("api", "rate_limit_enabled", True)
    rate_limit_reads: int = service_field("api", "rate_limit_reads", 600, ge=1)
    rate_limit_writes: int = service_field("api", "rate_limit_writes", 120, ge=1)
    rate_limit_triggers: int = service_field("api", "rate_limit_triggers", 60, ge=1)
    rate_limit_window_s: int = service_field("api", "rate_limit_window_s", 60, ge=1, le=3600)
    # How long a rotated key keeps working when the rotate request does not say (`grace_period_s`).
    key_rotation_grace_s: int = service_field("api", "key_rotation_grace_s", 86_400, ge=0)
    # Where a browser reaches ingest, for the console's trigger form (docs/console.md). Empty: the console's own host
    # at ingest's port, FLOWTRAIL_INGEST_PORT, as `flowtrail up` runs them.
    console_ingest_url: str = service_field("api", "console_ingest_url", "")
    # The deployment's operator key (docs/tenants.md): the bearer token of the operator routes `/v1/admin/…`, compared
    # in constant time. Empty: those routes answer 403 `operator_api_disabled`.
    operator_key: SecretStr = service_field("api", "operator_key", SecretStr(""))
    ingest_port: int = Field(default=DEFAULT_INGEST_PORT, validation_alias="FLOWTRAIL_INGEST_PORT")
    # The projector's SMTP server, which sends email alerts: without one an email channel is refused with 422 when a
    # rule is created or changed (docs/alerts.md), rather than accepted and never delivered.
    projector_smtp_host: str = Field(default="", validation_alias="FLOWTRAIL_PROJECTOR_SMTP_HOST")
