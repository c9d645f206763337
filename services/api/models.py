"""The API's answers as pydantic models: the typed contract of /openapi.json (docs/api-contract.md).

Routes that return a dict declare one of these as `response_model`, so FastAPI checks and shapes the answer; the
hot runs reads and the write actions build their JSON themselves (a pre-encoded response is returned as is), so
for them the model documents the answer and the contract tests (tests/e2e/test_contract.py) hold them to it.

Objects are closed (`additionalProperties: false`) except where the data is the caller's own and free-form:
trigger payloads, step inputs and outputs, errors' details, flow definitions, canonical records' fields.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JSON = Any  # a free-form JSON value: the caller's payloads, a step's input or output, an error's details


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """An object whose fields are the caller's data (extra fields are part of the answer)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- runs


class RunSummary(Out):
    id: str
    flow_id: str
    flow_version: int | None = None
    flow_name: str | None = None
    status: str = Field(description="QUEUED, SCHEDULED, BLOCKED, QUOTA_EXCEEDED, INVALID, RUNNING, PAUSED, ...")
    environment: str
    execution_mode: str
    trigger_type: str
    caller: str | None = None
    tags: list[str] = []
    parent_run_id: str | None = None
    retry_of: str | None = None
    bulk_operation_id: str | None = None
    failed_step: str | None = None
    error_message: str | None = None
    steps_count: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    duration_ms: float | None = None
    archived: bool | None = None
    error_category: str | None = None
    error_fingerprint: str | None = None


class RunsPage(Out):
    data: list[RunSummary]
    next_cursor: str | None
    prev_cursor: str | None


class Trigger(Out):
    type: str | None
    caller: str | None
    payload: JSON = None


class Records(Out):
    read: int = 0
    transformed: int = 0
    written: int = 0
    deduped: int = 0
    skipped: int = 0
    failed: int = 0


class DurationBreakdown(Out):
    total_ms: float | None = None
    queued_ms: float | None = None
    read_ms: float | None = None
    transform_ms: float | None = None
    write_ms: float | None = None
    wait_ms: float | None = None
    other_ms: float | None = None


class StepAttempt(Out):
    attempt: int
    status: str
    error: JSON = None
    retry_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    output: JSON = Field(
        default=None,
        description="what this attempt answered (an http_request's status, headers and body preview), capped and "
        "masked like the step's output",
    )


class RunStep(Out):
    name: str
    position: int | None = None
    action: str | None = None
    status: str
    attempt: int | None = None
    input: JSON = None
    output: JSON = None
    error: JSON = None
    assertions: list[JSON] = []
    extractions: dict[str, JSON] = {}
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    attempts: list[StepAttempt] = []
    reused_from: str | None = Field(
        default=None, description="FROM_FAILED_STEP: not run again in this run; the run in which the step ran"
    )
    reason: str | None = Field(
        default=None, description="a SKIPPED step: why it did not run (its run_condition and what it evaluated to)"
    )


class AsOf(Out):
    seq: int
    occurred_at: datetime


class RetryLink(Out):
    id: str
    strategy: str | None = Field(default=None, description="FROM_FAILED_STEP or ON_LATEST_VERSION")
    status: str
    created_at: datetime | None = None


class RunDetail(RunSummary):
    trigger: Trigger
    error: JSON = None
    cursor_window: JSON = None
    records: Records
    duration_breakdown: DurationBreakdown
    steps: list[RunStep]
    flow: JSON = Field(default=None, description="the flow definition of the version the run ran (secrets masked)")
    waiting_for: JSON = Field(default=None, description="while PAUSED: the human_input request to answer")
    as_of: AsOf | None = Field(default=None, description="with ?as_of=: the last event folded in")
    retry_strategy: str | None = Field(default=None, description="a retry: how it retried its `retry_of`")
    retries: list[RetryLink] = Field(default=[], description="the runs that retried this one, oldest first")


class RunEvent(Out):
    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    causation_id: str | None = None
    payload: JSON = None


class RunEvents(Out):
    data: list[RunEvent]
    has_more: bool


class LogLine(Out):
    seq: int
    level: str
    step: str | None = None
    message: str
    fields: JSON = None
    occurred_at: datetime


class RunLogs(Out):
    data: list[LogLine]
    has_more: bool


class RecordError(Out):
    seq: int
    step: str
    record_key: str
    field_path: str | None = None
    error: str
    raw_error: JSON = None
    occurred_at: datetime


class RunRecordErrors(Out):
    data: list[RecordError]
    has_more: bool


# ---------------------------------------------------------------- run actions


class RetryAccepted(Out):
    id: str
    run_id: str
    retry_of: str
    strategy: str
    status: str


class ActionAccepted(Out):
    run_id: str
    status: str = Field(description="CANCEL_REQUESTED, RESUME_REQUESTED or ARCHIVE_REQUESTED")
    request_id: str | None = None


class AlreadyArchived(Out):
    run_id: str
    archived: bool


class BulkResult(Out):
    bulk_operation_id: str | None = Field(description="null for a dry run")
    action: Literal["retry", "cancel", "archive"]
    dry_run: bool
    matched: int
    count: int
    skipped: dict[str, int] = Field(description="runs left alone, by reason")
    sample: list[RunSummary]
    requested_at: datetime
    new_run_ids: list[str] | None = None


# ---------------------------------------------------------------- analytics


class DurationPercentiles(Out):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None


class AnalyticsBucket(Out):
    bucket: datetime
    runs: int
    by_status: dict[str, int]
    by_trigger: dict[str, int]
    pass_rate: float | None = None
    duration_ms: DurationPercentiles
    records_written: int
    records_failed: int


class FlowAnalytics(Out):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    flow_id: str
    from_: datetime = Field(alias="from")
    to: datetime
    bucket: Literal["hour", "day"]
    runs: int
    pass_rate: float | None = None
    series: list[AnalyticsBucket]


class FlakyStep(Out):
    flow_id: str
    flow_version: int
    step: str
    succeeded: int
    failed: int
    retried: int
    last_failed_at: datetime | None = None
    score: float


class FlakySteps(Out):
    data: list[FlakyStep]


class FailureGroup(Out):
    fingerprint: str
    flow_id: str
    step: str | None = None
    category: str
    message_pattern: str
    sample_message: str
    runs: int
    first_seen: datetime
    last_seen: datetime
    last_run_id: str
    next_action: str


class FailureGroups(Out):
    data: list[FailureGroup]


class Endpoint(Out):
    flow_id: str
    method: str
    host: str
    route: str
    calls: int
    last_seen: datetime


class Endpoints(Out):
    data: list[Endpoint]


# ---------------------------------------------------------------- canonical data


class CanonicalRecord(Open):
    """The entity's normalised fields (free-form per entity) next to these; `fields=` picks some."""

    canonical_id: str
    external_ids: JSON = None
    last_source_update_at: datetime | None = None
    updated_at: datetime | None = None


class CanonicalRecords(Out):
    entity: str
    count: int
    next_cursor: str | None
    data: list[CanonicalRecord]


# ---------------------------------------------------------------- flows


class Schedule(Out):
    cron: str | None = None
    interval_s: float | None = None
    timezone: str
    next_run_at: datetime | None = None


class ConnectorUse(Out):
    step: str
    action: str
    role: str


class NamedConnector(Out):
    name: str
    used_by: list[ConnectorUse]


class FlowSummary(Out):
    id: str
    name: str
    description: str | None = None
    status: str
    environment: str
    trigger_type: str | None = None
    tags: list[str] = []
    latest_version: int
    schedule: Schedule | None = None
    connectors: list[str]
    last_run_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class FlowsMeta(Out):
    total: int
    has_more: bool


class FlowsPage(Out):
    data: list[FlowSummary]
    next_cursor: str | None
    meta: FlowsMeta


class FlowVersionRef(Out):
    version: int
    published_at: datetime


class FlowDetail(FlowSummary):
    connectors: list[NamedConnector]  # type: ignore[assignment]
    definition: JSON = Field(description="the latest definition, credentials in step inputs shown as ***")
    versions: list[FlowVersionRef]


class FlowWritten(FlowDetail):
    version: int
    projected: bool


class FlowPending(Out):
    """The write is durable; the read model has not caught up yet (GET shows it once projected)."""

    id: str
    version: int
    status: str
    projected: bool


class FlowVersion(Out):
    flow_id: str
    version: int
    published_at: datetime
    schedule: Schedule | None = None
    connectors: list[NamedConnector]
    definition: JSON = None


# ---------------------------------------------------------------- API keys


class ApiKey(Out):
    id: str
    name: str
    prefix: str
    environment: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    rotated_at: datetime | None = None
    replaced_by: str | None = None
    status: Literal["active", "rotated", "expired", "revoked"]


class NewApiKey(ApiKey):
    key: str = Field(description="the plaintext key, shown this once")


class RotatedApiKey(NewApiKey):
    previous: ApiKey


class ApiKeys(Out):
    data: list[ApiKey]


# ---------------------------------------------------------------- webhooks


class WebhookSubscription(Out):
    id: str
    url: str
    events: list[str]
    active: bool
    created_at: datetime


class NewWebhookSubscription(WebhookSubscription):
    secret: str = Field(description="signs deliveries; shown this once")


class WebhookSubscriptions(Out):
    data: list[WebhookSubscription]


class WebhookAttempt(Out):
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


class WebhookDelivery(Out):
    id: str
    event: str
    status: str
    attempts: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    body: JSON = None
    attempt_log: list[WebhookAttempt]


class WebhookDeliveries(Out):
    data: list[WebhookDelivery]


class Redelivery(Out):
    id: str
    status: str


# ---------------------------------------------------------------- alerts


class AlertRuleState(Out):
    open: bool
    consecutive_partial: int
    last_success_at: datetime | None = None
    last_success_run_id: str | None = None
    evaluated_at: datetime | None = None


class AlertRule(Out):
    id: str
    name: str
    flow_id: str
    kind: str
    n: int | None = None
    minutes: float | None = None
    threshold: float | None = None
    window_minutes: float | None = None
    min_runs: int | None = None
    channels: list[JSON]
    enabled: bool
    created_at: datetime
    updated_at: datetime
    state: AlertRuleState


class NewAlertRule(AlertRule):
    secret: str = Field(description="signs generic webhook alert deliveries; shown this once")


class AlertRules(Out):
    data: list[AlertRule]


class Alert(Out):
    id: str
    rule_id: str
    flow_id: str
    kind: str
    run_id: str | None = None
    fired_at: datetime
    reason: str
    payload: JSON = None
    resolved_at: datetime | None = None
    resolved_by_run_id: str | None = None
    status: Literal["open", "resolved"]


class Alerts(Out):
    data: list[Alert]
    next_cursor: str | None


class AlertDelivery(Out):
    id: str
    action: str
    channel_index: int
    channel_type: str
    target: str
    status: str
    attempts: int
    attempt_log: JSON = None
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    body: JSON = None


class AlertDetail(Alert):
    deliveries: list[AlertDelivery]


# ---------------------------------------------------------------- connectors


class ConnectorFailure(Out):
    run_id: str | None = None
    step: str | None = None


class ConnectorHealth(Out):
    degraded_since: datetime | None = None
    last_error: JSON = None
    last_auth_failure_at: datetime | None = None
    last_failure: ConnectorFailure | None = None
    last_success_at: datetime | None = None
    last_success_run_id: str | None = None


class ConnectorFlow(Out):
    id: str
    name: str
    steps: list[ConnectorUse]


class Connector(Out):
    id: str
    name: str
    kind: str
    config: JSON = Field(description="credentials shown as ***")
    status: str
    health: ConnectorHealth
    flows: list[ConnectorFlow]
    last_verified_at: datetime | None = None
    last_verify: JSON = None
    created_at: datetime
    updated_at: datetime


class Connectors(Out):
    data: list[Connector]
    next_cursor: str | None
    meta: FlowsMeta


class ConnectorCheck(Out):
    connector_id: str
    ok: bool
    detail: JSON = None
    error: JSON = None
    latency_ms: float
    checked_at: datetime
