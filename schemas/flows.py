"""Flow definitions: immutable versions of a flow's trigger config, steps and policies (DESIGN 5)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STEP_NAME_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_\-]{0,63}$"


class Environment(StrEnum):
    PRODUCTION = "PRODUCTION"
    TESTING = "TESTING"


class StepAction(StrEnum):
    HTTP_REQUEST = "http_request"
    TRANSFORM = "transform"
    DELAY = "delay"
    DATABASE_QUERY = "database_query"
    KAFKA_PRODUCE = "kafka_produce"
    KAFKA_CONSUME = "kafka_consume"
    HUMAN_INPUT = "human_input"
    SUBFLOW = "subflow"
    SYNC_RECORDS = "sync_records"
    PYTHON = "python"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(Frozen):
    """Backoff schedule in seconds; the attempt after the last delay is the last one."""

    # A negative delay would put retry_at in the past; a non-positive limit would silently never retry.
    delays_s: tuple[Annotated[float, Field(ge=0)], ...] = (1, 5, 30, 300, 1800, 7200)
    max_elapsed_s: float = Field(default=24 * 3600, gt=0)
    retry_conflict_once: bool = True


class Assertion(Frozen):
    """`expression` (JMESPath over the step's output) must equal `expected`."""

    expression: str
    expected: Any = None
    operator: Literal["eq", "ne", "gt", "gte", "lt", "lte", "contains", "exists"] = "eq"


class StepDefinition(Frozen):
    name: str = Field(pattern=STEP_NAME_PATTERN)
    action: StepAction
    input: dict[str, Any] = Field(default_factory=dict)
    run_condition: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryPolicy | None = None
    assertions: tuple[Assertion, ...] = ()
    # variable name → JMESPath over the step's output; later steps read `vars.<name>`.
    extract: dict[str, str] = Field(default_factory=dict)


class TriggerConfig(Frozen):
    type: Literal["manual", "api", "webhook", "schedule", "kafka"] = "manual"
    cron: str | None = None
    interval_s: float | None = None
    topic: str | None = None


class FlowDefinition(Frozen):
    id: str = Field(pattern=r"^[a-zA-Z0-9_\-]{1,64}$")
    tenant_id: str
    name: str
    version: int = Field(ge=1)
    description: str = ""
    environment: Environment = Environment.PRODUCTION
    trigger: TriggerConfig = TriggerConfig()
    steps: tuple[StepDefinition, ...] = Field(min_length=1)
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = Field(default=None, gt=0)
    concurrency_limit: int | None = Field(default=None, ge=1)
    tags: tuple[str, ...] = ()
    input_schema: dict[str, Any] | None = None

    @field_validator("steps")
    @classmethod
    def _unique_step_names(cls, steps: tuple[StepDefinition, ...]) -> tuple[StepDefinition, ...]:
        names = [s.name for s in steps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"step names must be unique; repeated: {', '.join(duplicates)}")
        return steps

    def step(self, name: str) -> StepDefinition:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def position(self, name: str) -> int:
        """The step's index in the flow, 0 for the first."""
        for i, s in enumerate(self.steps):
            if s.name == name:
                return i
        raise KeyError(name)
