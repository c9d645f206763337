"""The flows topic: a flow's immutable versions, and its pauses and resumes (docs/flows.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from schemas.events.common import new_id, utcnow
from schemas.flows import FlowDefinition, Frozen


class FlowEventBase(Frozen):
    event_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    tenant_id: str
    flow_id: str
    flow_version: int
    occurred_at: datetime = Field(default_factory=utcnow)


class FlowVersionPublished(FlowEventBase):
    type: Literal["FlowVersionPublished"] = "FlowVersionPublished"
    flow: FlowDefinition


class FlowPaused(FlowEventBase):
    type: Literal["FlowPaused"] = "FlowPaused"
    reason: str = ""


class FlowResumed(FlowEventBase):
    type: Literal["FlowResumed"] = "FlowResumed"


FlowEvent = Annotated[FlowVersionPublished | FlowPaused | FlowResumed, Field(discriminator="type")]
FLOW_EVENT_ADAPTER: TypeAdapter[FlowEventBase] = TypeAdapter(FlowEvent)
