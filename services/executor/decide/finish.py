"""How a run ends, and the log lines a reader of a run needs explained."""

from __future__ import annotations

from typing import Any, Literal

from schemas import events as ev
from schemas.events import ErrorInfo, EventBase
from schemas.status import RunStatus, StepStatus
from services.executor.decide.emitter import Emitter


def finish(
    out: Emitter,
    cls: type[EventBase],
    *,
    failed_step: str | None = None,
    error: ErrorInfo | None = None,
    reason: str = "",
) -> None:
    """End the run with `cls` (one of the endings, each with a RunFinishedPayload); in-flight steps are canceled."""
    st = out.run
    began = st.started_at or st.created_at
    duration_ms = (out.clock.now - began).total_seconds() * 1000
    if st.status in (RunStatus.RUNNING, RunStatus.PAUSED):
        # In-flight steps are abandoned: recorded CANCELED, and a result arriving later is ignored.
        for name, step in st.steps.items():
            if step.status in (StepStatus.RUNNING, StepStatus.RETRYING) and name != failed_step:
                out.emit(ev.StepCanceled, ev.StepCanceledPayload(step=name, attempt=step.attempt))
    payload = ev.RunFinishedPayload(duration_ms=duration_ms, failed_step=failed_step, error=error, reason=reason)
    out.emit(cls, payload)


def log(
    out: Emitter,
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"],
    message: str,
    step: str | None = None,
    **fields: Any,
) -> None:
    """A structured log line of the run (GET /v1/runs/{id}/logs). Written on the paths a reader of a run
    needs explained — retries, failures, pauses — not per successful step, which the step events say."""
    out.emit(ev.LogEmitted, ev.LogEmittedPayload(level=level, message=message, step=step, fields=fields))
