"""Ingest's trigger routes: the shared ones (services/common/trigger_routes.py, `POST /v1/flows/{flow_id}/trigger`
and `POST /v1/actions/{action_name}/async|live`) over ingest's intake: its trigger log, limits and metrics."""

from __future__ import annotations

from services.common.appender import Appender
from services.common.trigger_routes import router
from services.common.triggering import TriggerIntake
from services.common.triggerlog import TriggerLog
from services.ingest import metrics
from services.ingest.settings import IngestSettings

__all__ = ["intake", "router"]


def _appended(mode: str, runs: int, seconds: float) -> None:
    metrics.APPEND_SECONDS.observe(seconds)
    metrics.TRIGGERS.labels(mode).inc(runs)


def intake(settings: IngestSettings, trigger_log: TriggerLog, appender: Appender) -> TriggerIntake:
    return TriggerIntake(
        append=trigger_log.append,
        max_batch_inputs=settings.max_batch_inputs,
        max_input_bytes=settings.max_input_bytes,
        max_record_bytes=appender.max_record_bytes,
        live_timeout_s=settings.live_timeout_s,
        on_appended=_appended,
        on_append_failed=metrics.APPEND_FAILURES.inc,
    )
