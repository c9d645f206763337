"""What the executor is asked to do: a trigger (from ingest, the scheduler or the API) and the commands on a run."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from schemas.events.common import (
    CursorWindow,
    ErrorInfo,
    ExecutionMode,
    RetryStrategy,
    ReusedStep,
    TriggerInfo,
    new_id,
    utcnow,
)
from schemas.flows import Environment, Frozen

# ---------------------------------------------------------------- triggers topic (written by ingest)


class TriggerReceived(Frozen):
    """A request for a run, appended by ingest to the triggers topic, keyed by run_id."""

    type: Literal["TriggerReceived"] = "TriggerReceived"
    schema_version: int = 1
    trigger_id: str = Field(default_factory=new_id)
    tenant_id: str
    run_id: str
    flow_id: str
    flow_version: int | None = None  # None: the latest published version
    trigger: TriggerInfo
    environment: Environment = Environment.PRODUCTION
    execution_mode: ExecutionMode = ExecutionMode.ASYNC
    idempotency_key: str | None = None
    received_at: datetime = Field(default_factory=utcnow)
    # A run that starts later: it waits as SCHEDULED until then.
    run_at: datetime | None = None
    # A subflow's child run: the parent run, and the step (and its attempt) that waits for it.
    parent_run_id: str | None = None
    parent_step: str | None = None
    parent_attempt: int | None = None
    # A run linked to its parent by a trigger's `ap-parent-run-id` header (no step waits for it): its failure fails
    # the parent when the trigger asked so with `ap-fail-parent-on-failure: true` (docs/intake.md#nested-runs).
    fail_parent_on_failure: bool = False
    # A retry (docs/runs.md): the run retried, how, and for FROM_FAILED_STEP the outputs of the steps that succeeded.
    retry_of: str | None = None
    retry_strategy: RetryStrategy | None = None
    reuse: dict[str, Any] = Field(default_factory=dict)
    # The same steps: where each ran, its (masked) input and its extractions (absent from older triggers).
    reused: dict[str, ReusedStep] = Field(default_factory=dict)
    # The records to process again, by step (a retry of a PARTIAL run processes only the failed ones).
    only_keys: dict[str, list[str]] = Field(default_factory=dict)
    # The window a syncing run reads; a retry carries the original run's window.
    cursor_window: CursorWindow | None = None
    bulk_operation_id: str | None = None


# ---------------------------------------------------------------- commands topic (written by the API, keyed by run_id)


class CommandBase(Frozen):
    """An action on one run; the executor owning the run's partition turns it into ledger events (or ignores it)."""

    type: str  # narrowed by every command class to its name
    command_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    tenant_id: str
    run_id: str
    issued_at: datetime = Field(default_factory=utcnow)
    issued_by: str | None = None  # the API key id, or `executor` for commands runs send each other
    bulk_operation_id: str | None = None


class CancelRun(CommandBase):
    type: Literal["CancelRun"] = "CancelRun"
    reason: str = ""


class ResumeRun(CommandBase):
    """Answers a paused human_input step: `payload` becomes the step's output."""

    type: Literal["ResumeRun"] = "ResumeRun"
    request_id: str
    payload: Any = None


class ChildRunFinished(CommandBase):
    """Sent by the executor of a subflow's child run to the parent run (`run_id`) when the child ends."""

    type: Literal["ChildRunFinished"] = "ChildRunFinished"
    child_run_id: str
    step: str
    attempt: int
    status: str
    output: Any = None
    error: ErrorInfo | None = None


class SlotAvailable(CommandBase):
    """Sent by the executor that freed a slot of a flow with a concurrency limit to the BLOCKED run (`run_id`) that
    may now start: its executor asks the shared admission again (docs/architecture.md, Admission)."""

    type: Literal["SlotAvailable"] = "SlotAvailable"


class ArchiveRun(CommandBase):
    """Hide a finished run from default listings. The envelope of its RunArchived comes with it: the
    executor keeps only the ids and next seq of finished runs, not their state."""

    type: Literal["ArchiveRun"] = "ArchiveRun"
    flow_id: str
    flow_version: int
    correlation_id: str


Command = Annotated[CancelRun | ResumeRun | ChildRunFinished | SlotAvailable | ArchiveRun, Field(discriminator="type")]
COMMAND_ADAPTER: TypeAdapter[CommandBase] = TypeAdapter(Command)
