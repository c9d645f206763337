"""The events one decision emits: each numbered after the last, with a deterministic id, and folded at once so the
next step of the same decision sees the state it left."""

from __future__ import annotations

import functools
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from schemas.events import EventBase
from services.executor.decide.inputs import Clock
from services.executor.fold import RunState, fold

EVENT_NS = uuid.UUID("6f1d7c1e-9f57-4d55-9a54-2f3a4c1b0e77")
_EVENT_NS_BYTES = EVENT_NS.bytes


def event_id(run_id: str, seq: int) -> str:
    """The same decision always yields the same event id: a duplicate is visibly one.

    `uuid.uuid5(EVENT_NS, f"{run_id}:{seq}").hex` (RFC 4122: SHA-1 of namespace and name, version and variant bits
    set), computed without the UUID object, a third of the cost; a unit test holds the two equal."""
    digest = bytearray(hashlib.sha1(_EVENT_NS_BYTES + f"{run_id}:{seq}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


# EventBase's fields in their declared order: a validated event's `__dict__` holds them so, and pydantic's serialiser
# writes a model's fields in its `__dict__`'s order.
_ENVELOPE = ("type", "payload", "event_id", "schema_version", "tenant_id", "run_id", "flow_id", "flow_version", "seq",
             "occurred_at", "causation_id", "correlation_id")  # fmt: skip
# The fields a validated construction is given (the rest take their defaults): pydantic's `model_fields_set`.
_GIVEN = frozenset(_ENVELOPE) - {"type", "schema_version"}


@functools.cache
def _shape(cls: type[EventBase]) -> tuple[type[BaseModel], int]:
    """An event class's payload model and schema_version; its fields must be the envelope `build_event` writes."""
    fields = cls.model_fields
    if tuple(fields) != _ENVELOPE:
        raise TypeError(f"{cls.__name__}'s fields {tuple(fields)} are not the envelope build_event writes")
    payload = fields["payload"].annotation
    assert isinstance(payload, type) and issubclass(payload, BaseModel), (cls, payload)
    return payload, fields["schema_version"].get_default()


def build_event(
    cls: type[EventBase], payload: BaseModel, *, event_id: str, tenant_id: str, run_id: str, flow_id: str,
    flow_version: int, seq: int, occurred_at: datetime, causation_id: str, correlation_id: str,
) -> EventBase:  # fmt: skip
    """The event `cls(...)` would build from these fields, without validating them again (about half the cost):
    `payload` was validated where it was built (its class is checked here) and the envelope comes from the run's
    state and the clock. tests/unit/test_executor_event_build.py holds every event type built so equal to the validated
    one, field order, set fields and encoded bytes included."""
    payload_cls, schema_version = _shape(cls)
    if not isinstance(payload, payload_cls):
        raise TypeError(f"{cls.__name__} takes a {payload_cls.__name__}, not {type(payload).__name__}")
    event = object.__new__(cls)
    object.__setattr__(event, "__dict__", {
        "type": cls.__name__, "payload": payload, "event_id": event_id, "schema_version": schema_version,
        "tenant_id": tenant_id, "run_id": run_id, "flow_id": flow_id, "flow_version": flow_version, "seq": seq,
        "occurred_at": occurred_at, "causation_id": causation_id, "correlation_id": correlation_id,
    })  # fmt: skip
    object.__setattr__(event, "__pydantic_fields_set__", set(_GIVEN))
    object.__setattr__(event, "__pydantic_extra__", None)
    object.__setattr__(event, "__pydantic_private__", None)
    return event


@dataclass
class Emitter:
    state: RunState | None
    causation_id: str
    clock: Clock
    events: list[EventBase] = field(default_factory=list)

    @property
    def run(self) -> RunState:
        assert self.state is not None
        return self.state

    def emit(self, cls: type[EventBase], payload: BaseModel, **envelope: Any) -> None:
        """`payload` is the event's payload model (an event refuses any other); the envelope is the run's, or
        `envelope` for the run's first event."""
        st = self.state
        if st is None:
            event = build_event(cls, payload, event_id=event_id(envelope["run_id"], 0), seq=0,
                                occurred_at=self.clock.now, causation_id=self.causation_id, **envelope)  # fmt: skip
        else:
            seq = st.next_seq
            event = build_event(
                cls, payload, event_id=event_id(st.run_id, seq), tenant_id=st.tenant_id, run_id=st.run_id,
                flow_id=st.flow_id, flow_version=st.flow_version, seq=seq, occurred_at=self.clock.now,
                causation_id=self.causation_id, correlation_id=st.correlation_id,
            )  # fmt: skip
        self.events.append(event)
        self.state = fold(st, event)
