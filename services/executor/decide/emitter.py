"""The events one decision emits: each numbered after the last, with a deterministic id, and folded at once so the
next step of the same decision sees the state it left."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
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
        seq = st.next_seq if st else 0
        base = {
            "tenant_id": st.tenant_id if st else None,
            "run_id": st.run_id if st else None,
            "flow_id": st.flow_id if st else None,
            "flow_version": st.flow_version if st else None,
            "correlation_id": st.correlation_id if st else None,
            **envelope,
        }
        event = cls(
            event_id=event_id(base["run_id"], seq),
            seq=seq,
            occurred_at=self.clock.now,
            causation_id=self.causation_id,
            payload=payload,
            **base,
        )
        self.events.append(event)
        self.state = fold(st, event)
