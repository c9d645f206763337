"""A run's diagnosis (GET /v1/runs/{id}/diagnosis): the failing step, the same error in earlier runs, the
dependency's health, a root-cause class with the rules that decided it, and a next action (docs/runs.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from services.api.models import JSON, Out

RootCause = Literal["upstream_service_error", "auth_or_config", "data_validation", "timing_timeout", "flowtrail_bug"]


class DiagnosedError(Out):
    category: str | None = None
    code: str | None = None
    message: str
    status_code: int | None = None
    fingerprint: str | None = Field(
        default=None, description="as `GET /v1/analytics/failure-groups` and `GET /v1/runs?error_fingerprint=` name it"
    )
    message_pattern: str | None = Field(default=None, description="the message with ids, numbers and values folded")


class AssertionMismatch(Out):
    expression: str
    operator: str
    expected: JSON = None
    actual: JSON = None


class RejectedRecords(Out):
    count: int
    first_key: str | None = None
    first_field_path: str | None = None
    first_error: str | None = None


class FailedStep(Out):
    name: str
    action: str | None = None
    attempts: int = Field(description="how many attempts this run made of the step")
    retry_delays_s: list[float] | None = Field(
        default=None, description="the retry delays in force: the step's own `retry.delays_s`, else the flow's"
    )
    timeout_s: float | None = None


class VersionCount(Out):
    version: int
    runs: int
    occurrences: int = Field(description="runs of this version whose step failed with the fingerprint")


class History(Out):
    """The fingerprint across the last N runs of the flow, this one included (newest first up to this run)."""

    last_n: int
    runs: int = Field(description="runs looked at: at most `last_n`")
    occurrences: int = Field(description="runs in which an attempt of the step failed with this fingerprint")
    passed_on_retry: int = Field(description="of those, runs in which a later attempt of the step succeeded")
    first_seen: datetime | None = Field(default=None, description="earliest known: failure group or these runs")
    first_seen_run_id: str | None = None
    since_version: int | None = Field(default=None, description="the oldest flow version among the occurrences")
    appeared_with_version: bool = Field(
        description="runs of earlier versions were looked at and none had the fingerprint"
    )
    by_version: list[VersionCount]
    step_median_success_ms: float | None = Field(
        default=None, description="median duration of the step's successful attempts in these runs"
    )


class FieldChange(Out):
    field: str
    before: JSON = None
    after: JSON = None


class StepChange(Out):
    """What changed in the failing step's definition (or the flow's timeout) when the fingerprint appeared."""

    from_version: int
    to_version: int
    changes: list[FieldChange]


class DependencyHealth(Out):
    """Other runs' attempts that called the same connector or host around this run's time."""

    kind: Literal["connector", "host"]
    name: str
    window_from: datetime
    window_to: datetime
    failures: int
    successes: int
    failed_runs: int
    succeeded_runs: int
    failure_categories: dict[str, int]
    last_success_at: datetime | None = None
    status: str | None = Field(default=None, description="a connector's recorded health: ok or degraded")
    degraded_since: datetime | None = None


class Evidence(Out):
    rule: str
    supports: RootCause
    weight: int
    observed: dict[str, JSON] = Field(description="the values the rule saw")
    says: str


class Diagnosis(Out):
    step: FailedStep | None = None
    error: DiagnosedError
    assertion: AssertionMismatch | None = None
    rejected_records: RejectedRecords | None = None
    history: History | None = None
    step_change: StepChange | None = None
    dependency: DependencyHealth | None = None
    root_cause: RootCause
    scores: dict[str, int] = Field(description="the weights of the rules that fired, summed per root cause")
    evidence: list[Evidence]
    next_action: str


class RunDiagnosis(Out):
    run_id: str
    flow_id: str
    flow_version: int
    status: str
    failed: bool = Field(description="false: the run did not end in error; `diagnosis` is null and `message` says why")
    message: str
    diagnosis: Diagnosis | None = None
