"""The one codec: every event, command and trigger is (de)serialised with orjson here and nowhere else."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.events import (
    COMMAND_ADAPTER,
    FLOW_EVENT_ADAPTER,
    LEDGER_ADAPTER,
    CommandBase,
    EventBase,
    FlowEventBase,
    TriggerReceived,
)
from schemas.flows import STORED_FLOW
from schemas.upcasters import UpcastError, upcast

_OPTIONS = orjson.OPT_UTC_Z
T = TypeVar("T")


class DecodeError(ValueError):
    """An input that cannot be decoded; it goes to the dead-letter topic with this reason."""


def dumps(value: Any) -> bytes:
    """Serialise a model (its JSON-mode dump) or plain JSON data to bytes."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return orjson.dumps(value, option=_OPTIONS)


def dumps_model(value: BaseModel) -> bytes:
    """The bytes `dumps` gives for a model, written by pydantic's serialiser straight from the model instead of
    through its JSON-mode dump and orjson: about a quarter of the time for an event payload (the projector encodes one
    per ledger event; tests/unit/test_projector_payload_json.py checks both give the same bytes)."""
    return value.__pydantic_serializer__.to_json(value)


def dumps_triggers(template: TriggerReceived, run_ids: list[str], payloads: list[Any]) -> list[bytes]:
    """One encoded TriggerReceived per (run id, payload), the rest as in `template`: the bytes each would
    have on its own, without building and dumping 100,000 models for one batch request."""
    base = template.model_dump(mode="json")
    trigger = base["trigger"]  # overriding keys in place keeps the model's key order
    out = []
    for run_id, payload in zip(run_ids, payloads, strict=True):
        record = {
            **base,
            "trigger_id": os.urandom(16).hex(),
            "run_id": run_id,
            "trigger": {**trigger, "payload": payload},
        }
        # orjson's result keeps its whole write buffer (~4 KB); a 100,000-item batch held at once would
        # cost ~400 MB, so keep an exact-size copy and let the buffer be reused for the next one.
        out.append(bytes(memoryview(orjson.dumps(record, option=_OPTIONS))))
    return out


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def _load_object(data: bytes | str) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{exc.error_count()} validation error(s); first at {where or '<root>'}: {first['msg']}"


def _validated(validate: Callable[[Any], T], obj: dict[str, Any]) -> T:
    """`obj` upcast to its type's current schema_version and validated; every failure is a DecodeError.

    Unknown fields are ignored here, where stored records are read, though models refuse them where code builds
    them: a reader older than a new optional field, or newer than a dropped one, still reads every record
    (docs/decisions.md#unknown-fields)."""
    try:
        return validate(upcast(obj))
    except ValidationError as exc:
        raise DecodeError(_reason(exc)) from exc
    except UpcastError as exc:
        raise DecodeError(str(exc)) from exc


def decode_ledger_event(data: bytes | str) -> EventBase:
    return _validated(lambda obj: LEDGER_ADAPTER.validate_python(obj, extra="ignore"), _load_object(data))


def decode_flow_event(data: bytes | str) -> FlowEventBase:
    """A flows-topic event; a published definition is read as it was accepted then (STORED_FLOW: checks added to
    publishing since do not apply to it)."""
    return _validated(
        lambda obj: FLOW_EVENT_ADAPTER.validate_python(obj, context=STORED_FLOW, extra="ignore"), _load_object(data)
    )


def decode_trigger(data: bytes | str) -> TriggerReceived:
    return _validated(lambda obj: TriggerReceived.model_validate(obj, extra="ignore"), _load_object(data))


def decode_command(data: bytes | str) -> CommandBase:
    return _validated(lambda obj: COMMAND_ADAPTER.validate_python(obj, extra="ignore"), _load_object(data))


def ledger_event_from_dict(obj: dict[str, Any]) -> EventBase:
    """An event already parsed from JSON (e.g. read back from a jsonb column) → its model, upcast first."""
    return _validated(lambda o: LEDGER_ADAPTER.validate_python(o, extra="ignore"), obj)
