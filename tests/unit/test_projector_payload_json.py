"""The projector stores each ledger event's payload as codec.dumps_model writes it: the same bytes as codec.dumps, so
run_events.payload (and every read model derived from it) is what it was before the faster encoder."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings

from schemas import codec
from schemas import events as ev
from tests.factories import run_events
from tests.unit.test_codec import ledger_events


@settings(max_examples=300, deadline=None)
@given(event=ledger_events)
def test_every_ledger_payload_encodes_to_the_same_bytes(event: ev.EventBase) -> None:
    assert codec.dumps_model(event.payload) == codec.dumps(event.payload)


@pytest.mark.parametrize(
    "number", [0.1, 1 / 3, 1e16, 1e21, 1e22, 1e-7, 5e-324, 1e300, -0.0, 2.0**53, 12345678912345678.0, math.inf,
               math.nan, 10**18, -(2**63)],
)  # fmt: skip
def test_numbers_and_odd_strings_encode_to_the_same_bytes(number: float) -> None:
    succeeded = run_events("r1", steps=1)[4]
    assert isinstance(succeeded, ev.StepSucceeded)
    payload = succeeded.payload.model_copy(
        update={"duration_ms": number, "output": {"n": number, "s": 'é\u2028\x00"\\<>&\U0001f600', "l": [number]}}
    )
    assert codec.dumps_model(payload) == codec.dumps(payload)
