"""The one codec: every ledger, flow and trigger event survives bytes and back; garbage is a DecodeError."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from schemas import codec
from schemas import events as ev
from schemas.events import LEDGER_ADAPTER, LEDGER_EVENT_TYPES
from tests.unit.drive import make_flow

# ---------------------------------------------------------------- strategies

_text = st.text(max_size=20)
_ints = st.integers(-(2**63), 2**63 - 1)
_floats = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | _ints | _floats | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).flatmap(
    lambda d: st.sampled_from([d.replace(tzinfo=UTC), d.replace(tzinfo=timezone(timedelta(hours=5, minutes=30)))])
)
_opt_text = st.none() | _text
_nat = st.integers(0, 10**9)
_dur = st.floats(0, 1e9, allow_nan=False)

_errors = st.builds(
    ev.ErrorInfo,
    category=st.sampled_from(ev.ErrorCategory),
    message=_text,
    code=_opt_text,
    status_code=st.none() | st.integers(100, 599),
    field_path=_opt_text,
    details=st.dictionaries(_text, json_values, max_size=3),
)
_assertions = st.builds(
    ev.AssertionResult, expression=_text, operator=st.sampled_from(["eq", "gt", "exists"]), expected=json_values,
    actual=json_values, passed=st.booleans(),
)  # fmt: skip
_triggers = st.builds(ev.TriggerInfo, type=st.sampled_from(ev.TriggerType), caller=_opt_text, payload=json_values)

_windows = st.builds(ev.CursorWindow, updated_since=st.none() | _times, updated_until=_times)
_reused = st.builds(ev.ReusedStep, run_id=_text, input=json_values,
                    extractions=st.dictionaries(_text, json_values, max_size=2))  # fmt: skip

PAYLOADS: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    ev.RunRequestedPayload: st.builds(
        ev.RunRequestedPayload, trigger=_triggers, environment=st.sampled_from(ev.Environment),
        execution_mode=st.sampled_from(ev.ExecutionMode), flow_name=_text, tags=st.tuples(_text, _text),
        parent_run_id=_opt_text, retry_of=_opt_text, bulk_operation_id=_opt_text, received_at=st.none() | _times,
        parent_step=_opt_text, parent_attempt=st.none() | _nat,
        retry_strategy=st.none() | st.sampled_from(ev.RetryStrategy),
        only_keys=st.dictionaries(_text, st.lists(_text, max_size=3), max_size=2), run_at=st.none() | _times,
        cursor_window=st.none() | _windows, reuse=st.dictionaries(_text, json_values, max_size=2),
        reused=st.dictionaries(_text, _reused, max_size=2),
    ),
    ev.Empty: st.just(ev.Empty()),
    ev.ReasonPayload: st.builds(ev.ReasonPayload, reason=_text, errors=st.lists(_errors, max_size=2).map(tuple)),
    ev.RunScheduledPayload: st.builds(ev.RunScheduledPayload, run_at=_times),
    ev.RunPausedPayload: st.builds(ev.RunPausedPayload, request_id=_text, step=_opt_text, prompt=json_values,
                                   expires_at=st.none() | _times),
    ev.RunResumedPayload: st.builds(ev.RunResumedPayload, request_id=_opt_text, resumed_by=_opt_text),
    ev.StepStartedPayload: st.builds(
        ev.StepStartedPayload, step=_text, position=st.none() | _nat, action=_text, attempt=_nat, input=json_values
    ),
    ev.StepAttemptFailedPayload: st.builds(
        ev.StepAttemptFailedPayload, step=_text, attempt=_nat, error=_errors, retry_at=st.none() | _times,
        duration_ms=_dur,
    ),
    ev.StepSucceededPayload: st.builds(
        ev.StepSucceededPayload, step=_text, attempt=_nat, output=json_values, duration_ms=_dur,
        assertions=st.lists(_assertions, max_size=2).map(tuple),
        extractions=st.dictionaries(_text, json_values, max_size=3), reused_from=_opt_text,
        position=st.none() | _nat, action=_opt_text, input=json_values,
    ),
    ev.StepFailedPayload: st.builds(
        ev.StepFailedPayload, step=_text, attempt=_nat, error=_errors, output=json_values, duration_ms=_dur,
        assertions=st.lists(_assertions, max_size=2).map(tuple),
    ),
    ev.StepSkippedPayload: st.builds(ev.StepSkippedPayload, step=_text, position=st.none() | _nat, reason=_text),
    ev.StepCanceledPayload: st.builds(ev.StepCanceledPayload, step=_text, attempt=_nat),
    ev.RecordsProcessedPayload: st.builds(
        ev.RecordsProcessedPayload, step=_text, read=_nat, transformed=_nat, written=_nat, deduped=_nat,
        skipped=_nat, failed=_nat,
    ),
    ev.RecordFailedPayload: st.builds(
        ev.RecordFailedPayload, step=_text, record_key=_text, field_path=_opt_text, error=_text, raw_error=json_values
    ),
    ev.RunStartedPayload: st.builds(
        ev.RunStartedPayload,
        cursor_window=st.none() | _windows,
    ),
    ev.RecordsUpsertedPayload: st.builds(
        ev.RecordsUpsertedPayload, step=_text, entity=st.sampled_from(ev.CANONICAL_ENTITIES),
        records=st.lists(st.builds(
            ev.CanonicalRecord, external_ids=st.dictionaries(_text, _text, min_size=1, max_size=3),
            data=st.dictionaries(_text, json_values, max_size=4), source_updated_at=st.none() | _times,
        ), max_size=3).map(tuple),
    ),
    ev.ConnectorDegradedPayload: st.builds(ev.ConnectorDegradedPayload, connector=_text, step=_text, error=_errors),
    ev.LogEmittedPayload: st.builds(
        ev.LogEmittedPayload, level=st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR"]), message=_text,
        step=_opt_text, fields=st.dictionaries(_text, json_values, max_size=3),
    ),
    ev.RunCancelRequestedPayload: st.builds(
        ev.RunCancelRequestedPayload, reason=_text, requested_by=_opt_text, bulk_operation_id=_opt_text
    ),
    ev.RunFinishedPayload: st.builds(
        ev.RunFinishedPayload, duration_ms=_dur, failed_step=_opt_text, error=st.none() | _errors, reason=_text
    ),
    ev.RunArchivedPayload: st.builds(ev.RunArchivedPayload, bulk_operation_id=_opt_text),
}  # fmt: skip


def _payload_type(cls: type[ev.EventBase]) -> type[BaseModel]:
    return cls.model_fields["payload"].annotation  # type: ignore[return-value]


def events_of(cls: type[ev.EventBase]) -> st.SearchStrategy[ev.EventBase]:
    return st.builds(
        cls,
        payload=PAYLOADS[_payload_type(cls)],
        event_id=_text,
        schema_version=st.integers(1, 3),
        tenant_id=_text,
        run_id=_text,
        flow_id=_text,
        flow_version=_nat,
        seq=_nat,
        occurred_at=_times,
        causation_id=_text,
        correlation_id=_text,
    )


ledger_events = st.sampled_from(LEDGER_EVENT_TYPES).flatmap(events_of)


def sample(cls: type[ev.EventBase], **payload: Any) -> ev.EventBase:
    return cls(tenant_id="t1", run_id="r1", flow_id="f1", flow_version=1, seq=4, causation_id="c", correlation_id="r1",
               occurred_at=datetime(2024, 5, 1, tzinfo=UTC), payload=payload)  # fmt: skip


# ---------------------------------------------------------------- round trips


def test_every_payload_type_has_a_strategy() -> None:
    assert {_payload_type(cls) for cls in LEDGER_EVENT_TYPES} == set(PAYLOADS)


@pytest.mark.parametrize("cls", LEDGER_EVENT_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_ledger_event_type_round_trips(cls: type[ev.EventBase], data: st.DataObject) -> None:
    event = data.draw(events_of(cls))
    raw = codec.dumps(event)
    assert isinstance(raw, bytes)
    decoded = codec.decode_ledger_event(raw)
    assert type(decoded) is cls and decoded.type == cls.__name__
    assert decoded == event
    # And the bytes are stable: encoding the decoded event gives the same bytes.
    assert codec.dumps(decoded) == raw


@settings(max_examples=100, deadline=None)
@given(event=ledger_events)
def test_ledger_adapter_and_codec_agree(event: ev.EventBase) -> None:
    raw = codec.dumps(event)
    assert LEDGER_ADAPTER.validate_json(raw) == event
    assert orjson.loads(raw) == event.model_dump(mode="json")


def test_bytes_are_orjson_with_utc_z_timestamps() -> None:
    event = sample(ev.RunScheduled, run_at=datetime(2024, 5, 2, 3, 4, 5, 600000, tzinfo=UTC))
    raw = codec.dumps(event)
    assert raw == orjson.dumps(event.model_dump(mode="json"))
    obj = orjson.loads(raw)
    assert obj["type"] == "RunScheduled" and obj["seq"] == 4
    assert obj["occurred_at"] == "2024-05-01T00:00:00Z"
    assert obj["payload"] == {"run_at": "2024-05-02T03:04:05.600000Z"}
    assert b" " not in raw.replace(b'"', b"")  # compact, as orjson writes it


def test_dumps_and_loads_plain_json() -> None:
    assert codec.dumps({"a": [1, 2.5, None]}) == b'{"a":[1,2.5,null]}'
    assert codec.loads(b'{"a":[1,2.5,null]}') == {"a": [1, 2.5, None]}
    assert codec.dumps(datetime(2024, 1, 1, tzinfo=UTC)) == b'"2024-01-01T00:00:00Z"'


def test_decode_accepts_str_as_well_as_bytes() -> None:
    event = sample(ev.RunQueued)
    assert codec.decode_ledger_event(codec.dumps(event).decode()) == event


def test_unknown_fields_are_ignored_so_optional_fields_can_be_added() -> None:
    obj = orjson.loads(codec.dumps(sample(ev.StepSkipped, step="s", position=2)))
    obj["added_later"] = 1
    obj["payload"]["also_new"] = {"x": 1}
    decoded = codec.decode_ledger_event(orjson.dumps(obj))
    assert decoded.type == "StepSkipped" and decoded.payload.position == 2


def test_step_started_without_position_still_decodes() -> None:
    obj = orjson.loads(codec.dumps(sample(ev.StepStarted, step="s", action="transform")))
    del obj["payload"]["position"]
    assert codec.decode_ledger_event(orjson.dumps(obj)).payload.position is None


def test_flow_events_round_trip() -> None:
    flow = make_flow({"name": "a", "assertions": [{"expression": "status", "expected": 200}]})
    for event in (
        ev.FlowVersionPublished(tenant_id="t1", flow_id=flow.id, flow_version=3, flow=flow),
        ev.FlowPaused(tenant_id="t1", flow_id=flow.id, flow_version=3, reason="maintenance"),
        ev.FlowResumed(tenant_id="t1", flow_id=flow.id, flow_version=3),
    ):
        decoded = codec.decode_flow_event(codec.dumps(event))
        assert type(decoded) is type(event) and decoded == event


@settings(max_examples=50, deadline=None)
@given(payload=json_values, caller=_opt_text, key=_opt_text)
def test_triggers_round_trip(payload: Any, caller: str | None, key: str | None) -> None:
    trigger = ev.TriggerReceived(tenant_id="t1", run_id="r1", flow_id="f1", idempotency_key=key,
                                 trigger=ev.TriggerInfo(type="webhook", caller=caller, payload=payload))  # fmt: skip
    assert codec.decode_trigger(codec.dumps(trigger)) == trigger


_commands = st.one_of(
    st.builds(ev.CancelRun, tenant_id=_text, run_id=_text, reason=_text, issued_by=_opt_text,
              bulk_operation_id=_opt_text, issued_at=_times),
    st.builds(ev.ResumeRun, tenant_id=_text, run_id=_text, request_id=_text, payload=json_values, issued_at=_times),
    st.builds(ev.ChildRunFinished, tenant_id=_text, run_id=_text, child_run_id=_text, step=_text, attempt=_nat,
              status=_text, output=json_values, error=st.none() | _errors, issued_at=_times),
    st.builds(ev.ArchiveRun, tenant_id=_text, run_id=_text, flow_id=_text, flow_version=_nat, correlation_id=_text,
              bulk_operation_id=_opt_text, issued_at=_times),
)  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(command=_commands)
def test_commands_round_trip(command: ev.CommandBase) -> None:
    decoded = codec.decode_command(codec.dumps(command))
    assert type(decoded) is type(command) and decoded == command


def test_an_unknown_command_is_a_decode_error_naming_the_accepted() -> None:
    with pytest.raises(codec.DecodeError, match="CancelRun"):
        codec.decode_command(b'{"type": "Explode", "tenant_id": "t", "run_id": "r"}')


# ---------------------------------------------------------------- garbage


def _valid() -> dict[str, Any]:
    return orjson.loads(codec.dumps(sample(ev.StepSucceeded, step="s", output={"x": 1})))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"RunQueued"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object, got NoneType"),
        (b"{}", "validation error"),
    ],
)
def test_garbage_is_a_decode_error_with_a_reason(raw: bytes, reason: str) -> None:
    for decode in (codec.decode_ledger_event, codec.decode_flow_event, codec.decode_trigger):
        with pytest.raises(codec.DecodeError, match=reason):
            decode(raw)


def test_unknown_event_type_is_a_decode_error() -> None:
    obj = _valid() | {"type": "RunExploded"}
    with pytest.raises(codec.DecodeError, match="RunExploded"):
        codec.decode_ledger_event(orjson.dumps(obj))


@pytest.mark.parametrize("field", ["run_id", "seq", "tenant_id", "causation_id", "payload", "type"])
def test_missing_envelope_field_is_a_decode_error_naming_it(field: str) -> None:
    obj = _valid()
    del obj[field]
    with pytest.raises(codec.DecodeError) as info:
        codec.decode_ledger_event(orjson.dumps(obj))
    if field != "type":
        assert field in str(info.value)


def test_missing_payload_field_is_a_decode_error_naming_where() -> None:
    obj = _valid()
    del obj["payload"]["step"]
    with pytest.raises(codec.DecodeError, match=r"StepSucceeded\.payload\.step: Field required"):
        codec.decode_ledger_event(orjson.dumps(obj))


@pytest.mark.parametrize(
    ("change", "where"),
    [({"seq": -1}, "seq"), ({"seq": "first"}, "seq"), ({"occurred_at": "yesterday"}, "occurred_at"),
     ({"payload": {"step": "s", "error": {"category": "OOPS", "message": "m"}}}, "category")],
)  # fmt: skip
def test_wrong_values_are_decode_errors(change: dict[str, Any], where: str) -> None:
    obj = _valid() | change
    if "error" in str(change):
        obj["type"] = "StepFailed"
    with pytest.raises(codec.DecodeError, match=where):
        codec.decode_ledger_event(orjson.dumps(obj))


def test_the_reason_counts_the_errors() -> None:
    with pytest.raises(codec.DecodeError, match=r"^\d+ validation error\(s\); first at "):
        codec.decode_ledger_event(orjson.dumps({"type": "RunQueued"}))


@pytest.mark.parametrize(
    "change", [{"schema_version": "two"}, {"schema_version": None}, {"type": ["RunQueued"]}, {"type": {}}],
    ids=["version-text", "version-null", "type-list", "type-object"],
)  # fmt: skip
def test_malformed_envelope_values_are_decode_errors_too(change: dict[str, Any]) -> None:
    raw = orjson.dumps(_valid() | change)
    for decode in (codec.decode_ledger_event, codec.decode_flow_event, codec.decode_trigger):
        with pytest.raises(codec.DecodeError):
            decode(raw)


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["type", "schema_version", "seq", "run_id", "payload"]), json_values))
def test_any_json_object_either_decodes_or_is_a_decode_error(obj: dict[str, Any]) -> None:
    # Only DecodeError may escape: consumers dead-letter it and move on (invariant 6).
    # Values for `type` and `schema_version` that crash upcast() are covered by the xfail test above.
    if not isinstance(obj.get("type", ""), str) or not isinstance(obj.get("schema_version", 1), int):
        obj["type"], obj["schema_version"] = "RunQueued", 1
    try:
        codec.decode_ledger_event(orjson.dumps(obj))
    except codec.DecodeError:
        pass


def test_a_batch_of_triggers_encodes_exactly_as_each_model_would() -> None:
    template = ev.TriggerReceived(
        tenant_id="t1", run_id="", flow_id="orders", flow_version=3,
        trigger=ev.TriggerInfo(type=ev.TriggerType.API, caller="key_1"), execution_mode=ev.ExecutionMode.LIVE,
    )  # fmt: skip
    payloads = [{"order_id": "SO-1"}, None, [1, 2], "text"]
    encoded = codec.dumps_triggers(template, ["r1", "r2", "r3", "r4"], payloads)
    decoded = [codec.decode_trigger(b) for b in encoded]
    assert len({d.trigger_id for d in decoded}) == 4
    for d, run_id, payload, raw in zip(decoded, ["r1", "r2", "r3", "r4"], payloads, encoded, strict=True):
        trigger = template.trigger.model_copy(update={"payload": payload})
        alone = template.model_copy(update={"run_id": run_id, "trigger_id": d.trigger_id, "trigger": trigger})
        assert d == alone
        assert raw == codec.dumps(alone)


# ---------------------------------------------------------------- unknown fields: refused when built, ignored when read


def test_a_misspelled_field_fails_where_a_payload_is_built() -> None:
    with pytest.raises(ValidationError, match="retry_a"):
        ev.StepAttemptFailedPayload(step="s", attempt=1, error=ev.ErrorInfo(category="TRANSIENT", message="m"),
                                    retry_a=datetime(2024, 5, 1, tzinfo=UTC))  # type: ignore[call-arg]  # fmt: skip
    with pytest.raises(ValidationError, match="duration"):
        sample(ev.RunFailed, duration=5)  # a dict payload is checked the same way
    with pytest.raises(ValidationError, match="categroy"):
        ev.ErrorInfo(category="AUTH", message="m", categroy="AUTH")  # type: ignore[call-arg]


_MODELS = [*LEDGER_EVENT_TYPES, ev.TriggerReceived, ev.CancelRun, ev.ResumeRun, ev.ChildRunFinished, ev.ArchiveRun,
           ev.FlowPaused]  # fmt: skip


@pytest.mark.parametrize("cls", _MODELS, ids=lambda c: c.__name__)
def test_every_event_command_and_payload_model_refuses_unknown_fields(cls: type[BaseModel]) -> None:
    assert cls.model_config.get("extra") == "forbid" and cls.model_config.get("frozen") is True
    if issubclass(cls, ev.EventBase):
        assert _payload_type(cls).model_config.get("extra") == "forbid"


def test_stored_records_with_fields_this_reader_does_not_know_still_decode() -> None:
    """A record written by a newer writer (an added optional field) or carrying a field since removed is read."""
    failed = sample(ev.StepFailed, step="s", error={"category": "AUTH", "message": "m"})
    obj = orjson.loads(codec.dumps(failed))
    obj["payload"]["error"]["removed_since"] = "x"
    obj["payload"]["retried_by"] = None
    assert codec.decode_ledger_event(orjson.dumps(obj)) == failed
    trigger = ev.TriggerReceived(tenant_id="t1", run_id="r1", flow_id="f1", trigger=ev.TriggerInfo(type="api"))
    raw = orjson.loads(codec.dumps(trigger)) | {"priority": 3}
    raw["trigger"]["source_ip"] = "10.0.0.1"
    assert codec.decode_trigger(orjson.dumps(raw)) == trigger
    cancel = ev.CancelRun(tenant_id="t1", run_id="r1", reason="stop")
    assert codec.decode_command(orjson.dumps(orjson.loads(codec.dumps(cancel)) | {"urgent": True})) == cancel
    paused = ev.FlowPaused(tenant_id="t1", flow_id="f1", flow_version=2, reason="x")
    assert codec.decode_flow_event(orjson.dumps(orjson.loads(codec.dumps(paused)) | {"paused_by": "k"})) == paused
    assert codec.ledger_event_from_dict(dict(obj)) == failed  # as read back from run_events


def test_the_ledger_union_the_registry_and_the_status_views_come_from_one_list() -> None:
    union = ev.AnyLedgerEvent.__args__  # type: ignore[attr-defined]
    assert ev.LEDGER_EVENT_TYPES == union
    assert list(ev.LEDGER_EVENTS_BY_TYPE) == [cls.__name__ for cls in union]
    assert set(ev.RUN_STATUS_OF) | set(ev.STEP_STATUS_OF) | set(ev.ATTEMPT_STATUS_OF) <= set(union)
    assert set(ev.TERMINAL_EVENTS) <= set(ev.RUN_STATUS_OF)
