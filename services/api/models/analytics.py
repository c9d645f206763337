"""Flow analytics: pass rate and durations over time, flaky steps, failure groups, endpoints called."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from services.api.models import Out


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
