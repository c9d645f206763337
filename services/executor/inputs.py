"""A flow's `input_schema` (JSON Schema) checked against a trigger's payload: a run that fails it ends INVALID."""

from __future__ import annotations

from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from schemas.events import ErrorCategory, ErrorInfo
from schemas.flows import FlowDefinition

_MAX_ERRORS = 20
# Compiled validators by the schema's canonical JSON: one compile per distinct schema, whatever flow holds it.
_validators: dict[bytes, Draft202012Validator | SchemaError] = {}


def _validator(flow: FlowDefinition) -> Draft202012Validator | SchemaError:
    key = orjson.dumps(flow.input_schema, option=orjson.OPT_SORT_KEYS)
    found = _validators.get(key)
    if found is None:
        assert flow.input_schema is not None
        try:
            Draft202012Validator.check_schema(flow.input_schema)
            found = Draft202012Validator(flow.input_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        except SchemaError as exc:
            found = exc
        _validators[key] = found
    return found


def input_errors(flow: FlowDefinition, payload: Any) -> list[ErrorInfo]:
    """Every way `payload` breaks the flow's input schema (at most 20), each with the path of the field."""
    if flow.input_schema is None:
        return []
    validator = _validator(flow)
    if isinstance(validator, SchemaError):
        message = f"the flow's input_schema is not valid JSON Schema: {validator.message}"
        return [ErrorInfo(category=ErrorCategory.VALIDATION, code="invalid_input_schema", message=message)]
    errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.absolute_path))[:_MAX_ERRORS]
    return [
        ErrorInfo(
            category=ErrorCategory.VALIDATION,
            code="invalid_input",
            field_path=".".join(str(p) for p in e.absolute_path) or None,
            message=f"{'.'.join(str(p) for p in e.absolute_path) or 'input'}: {e.message}",
        )
        for e in errors
    ]
