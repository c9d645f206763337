"""The ledger's one list of event types, and what is derived from it (docs/architecture.md#events): the union the
codec reads, the tuple of classes, the type-name registry and the class-keyed views of the status table."""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import Field, TypeAdapter

from schemas.events.common import EventBase
from schemas.events.records import RecordFailed, RecordsProcessed, RecordsUpserted
from schemas.events.runs import (
    RunArchived,
    RunBlocked,
    RunCanceled,
    RunCancelRequested,
    RunFailed,
    RunInternalError,
    RunInvalid,
    RunPartiallySucceeded,
    RunPaused,
    RunQueued,
    RunQuotaExceeded,
    RunRequested,
    RunResumed,
    RunScheduled,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
)
from schemas.events.steps import (
    ConnectorDegraded,
    LogEmitted,
    StepAttemptFailed,
    StepCanceled,
    StepFailed,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)
from schemas.status import (
    ATTEMPT_STATUS_BY_EVENT,
    RUN_STATUS_BY_EVENT,
    STEP_STATUS_BY_EVENT,
    TERMINAL_RUN_EVENTS,
    RunStatus,
    StepStatus,
)

# The one list of ledger event types: the union above. Everything else is derived from it.
AnyLedgerEvent = (
    RunRequested
    | RunQueued
    | RunScheduled
    | RunBlocked
    | RunQuotaExceeded
    | RunInvalid
    | RunStarted
    | StepStarted
    | StepAttemptFailed
    | StepSucceeded
    | StepFailed
    | StepSkipped
    | StepCanceled
    | RecordsProcessed
    | RecordFailed
    | RecordsUpserted
    | ConnectorDegraded
    | LogEmitted
    | RunPaused
    | RunResumed
    | RunCancelRequested
    | RunCanceled
    | RunSucceeded
    | RunPartiallySucceeded
    | RunFailed
    | RunTimedOut
    | RunInternalError
    | RunArchived
)
LedgerEvent = Annotated[AnyLedgerEvent, Field(discriminator="type")]
LEDGER_EVENT_TYPES: tuple[type[EventBase], ...] = get_args(AnyLedgerEvent)
LEDGER_EVENTS_BY_TYPE: dict[str, type[EventBase]] = {cls.__name__: cls for cls in LEDGER_EVENT_TYPES}
LEDGER_ADAPTER: TypeAdapter[EventBase] = TypeAdapter(LedgerEvent)

# The status table (schemas/status.py) by event class, for folds that dispatch on classes; a name in the table that
# is no event class fails here, at import.
RUN_STATUS_OF: dict[type[EventBase], RunStatus] = {LEDGER_EVENTS_BY_TYPE[t]: s for t, s in RUN_STATUS_BY_EVENT.items()}
STEP_STATUS_OF: dict[type[EventBase], StepStatus] = {
    LEDGER_EVENTS_BY_TYPE[t]: s for t, s in STEP_STATUS_BY_EVENT.items()
}
ATTEMPT_STATUS_OF: dict[type[EventBase], StepStatus] = {
    LEDGER_EVENTS_BY_TYPE[t]: s for t, s in ATTEMPT_STATUS_BY_EVENT.items()
}
# The events that end a run, by class, and by type name with the status as text (for code reading stored rows).
TERMINAL_EVENTS: dict[type[EventBase], RunStatus] = {
    LEDGER_EVENTS_BY_TYPE[t]: s for t, s in TERMINAL_RUN_EVENTS.items()
}
TERMINAL_EVENT_STATUS: dict[str, str] = {t: s.value for t, s in TERMINAL_RUN_EVENTS.items()}
