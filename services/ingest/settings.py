"""Ingest settings: `FLOWTRAIL_INGEST_…` on top of the shared `FLOWTRAIL_…` ones."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import DEFAULT_API_PORT, DEFAULT_INGEST_PORT, CommonSettings, service_field


class IngestSettings(CommonSettings):
    host: str = service_field("ingest", "host", "127.0.0.1")
    port: int = service_field("ingest", "port", DEFAULT_INGEST_PORT)
    max_batch_inputs: int = service_field("ingest", "max_batch_inputs", 100_000)
    # A request body larger than this is refused with 413 before it is read (100,000 inputs of ~300 bytes fit).
    max_body_bytes: int = service_field("ingest", "max_body_bytes", 64 * 1024 * 1024, ge=1024)
    # One input, as its encoded run request: larger ones are refused with 413 naming the input's index (it is
    # also capped by what fits one Kafka message, FLOWTRAIL_KAFKA_MAX_MESSAGE_BYTES).
    max_input_bytes: int = service_field("ingest", "max_input_bytes", 512 * 1024, ge=1024)
    # `mode: live` waits this long for the run's final status before answering with its current one.
    live_timeout_s: float = service_field("ingest", "live_timeout_s", 30.0)
    # 0: an idle producer sends at once; under load records gather while a request is in flight (one per broker
    # at a time), so batches grow with the load (docs/decisions.md, "No producer linger on the hot path").
    producer_linger_ms: int = service_field("ingest", "producer_linger_ms", 0, ge=0)
    # Schedule flows (services/ingest/scheduler.py): on in every replica; a tick fired twice is one run.
    scheduler: bool = service_field("ingest", "scheduler", True)
    # After an outage only the newest missed tick fires, and only while at most this old (≥ 1 s: a tick a
    # moment late still fires).
    scheduler_max_catch_up_s: float = service_field("ingest", "scheduler_max_catch_up_s", 3600.0, ge=1)
    scheduler_poll_s: float = service_field("ingest", "scheduler_poll_s", 1.0, gt=0, le=60)
    # Per-key sliding-window rate limits (seed 003): requests per window, shared by every process serving a
    # key through PostgreSQL. Reads are GET/HEAD, triggers POST /v1/flows/{id}/trigger, writes the rest.
    rate_limit_enabled: bool = service_field("ingest", "rate_limit_enabled", True)
    rate_limit_reads: int = service_field("ingest", "rate_limit_reads", 600, ge=1)
    rate_limit_writes: int = service_field("ingest", "rate_limit_writes", 120, ge=1)
    rate_limit_triggers: int = service_field("ingest", "rate_limit_triggers", 60, ge=1)
    rate_limit_window_s: int = service_field("ingest", "rate_limit_window_s", 60, ge=1, le=3600)
    # Kafka-triggered flows (docs/kafka-triggers.md): on in every replica; replicas share each flow's partitions.
    kafka_triggers: bool = service_field("ingest", "kafka_triggers", True)
    # Messages fetched, made into runs and appended at once per flow: the bound on what is in flight.
    kafka_trigger_batch: int = service_field("ingest", "kafka_trigger_batch", 500, ge=1, le=1000)
    # Backpressure: no message is fetched while the executor has more triggers than this still to take (0: off).
    kafka_trigger_max_executor_lag: int = service_field("ingest", "kafka_trigger_max_executor_lag", 20_000, ge=0)
    # The topics a flow may read (a regular expression over the whole name); Flowtrail's own never.
    kafka_trigger_topics: str = service_field("ingest", "kafka_trigger_topics", ".*")
    # How soon a dead replica's partitions go to the others.
    kafka_trigger_session_timeout_ms: int = service_field(
        "ingest", "kafka_trigger_session_timeout_ms", 10_000, ge=1000, le=300_000
    )
    # A kafka trigger's tenant connector may name private and loopback brokers (docs/network-guard.md).
    allow_private_networks: bool = service_field("ingest", "allow_private_networks", False)
    # Deployment-wide kafka connectors a trigger may name (name → `kafka://host:port[,…]`), trusted: not guarded.
    connectors: dict[str, str] = service_field("ingest", "connectors", {})
    # Web pages that may trigger flows from a browser (CORS, docs/console.md): origins, comma-separated; bearer keys
    # only, never cookies. Empty: the web console of this deployment's API, http://127.0.0.1:<FLOWTRAIL_API_PORT>
    # (and localhost), as `flowtrail up` runs it.
    cors_origins: str = service_field("ingest", "cors_origins", "")
    api_port: int = Field(default=DEFAULT_API_PORT, validation_alias="FLOWTRAIL_API_PORT")

    @property
    def allowed_origins(self) -> list[str]:
        named = [origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip()]
        return named or [f"http://{host}:{self.api_port}" for host in ("127.0.0.1", "localhost")]
