"""The launch API's answers that live in the API alone (docs/runs.md): resuming a run, the schedules list."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from services.api.models import Out


class ResumeAccepted(Out):
    """202: the paused run's pending request answered (`RESUME_REQUESTED`), or a stopped run continued by a new run
    that reuses what succeeded (`QUEUED`, the new run's id in `run_id`, the stopped one in `resumed_from`)."""

    run_id: str
    status: Literal["RESUME_REQUESTED", "QUEUED"]
    resumed: Literal["human_input", "continued"] = Field(
        description="human_input: the PAUSED run goes on; continued: a new run picks up where the stopped one ended"
    )
    request_id: str | None = None
    resumed_from: str | None = None


class ScheduleEntry(Out):
    """A flow whose trigger is a cron or an interval, and when the scheduler fires it next (none while paused)."""

    flow_id: str
    flow_name: str
    status: Literal["active", "paused"]
    latest_version: int
    cron: str | None = None
    interval_s: float | None = None
    timezone: str
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None


class PendingRun(Out):
    """A run triggered with `run_at`, SCHEDULED until then."""

    run_id: str
    flow_id: str
    run_at: datetime | None = Field(description="null only in the moment before the executor records it")
    created_at: datetime


class SchedulesPage(Out):
    schedules: list[ScheduleEntry]
    pending_runs: list[PendingRun]
