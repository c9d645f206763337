"""Query strings validated as one pydantic model, without FastAPI's per-request reflection over its fields.

FastAPI (0.165) re-inspects every field's annotation on each request to decide whether it repeats; for the
twenty-odd filters of GET /v1/runs that cost more than the SQL's own round trip. Here the repeating fields
are found once, and the OpenAPI parameters FastAPI would have listed are listed once too.
"""

from __future__ import annotations

import typing
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError


def _repeats(annotation: Any) -> bool:
    """`list[str]`, `list[str] | None`: a parameter that may be given several times."""
    if typing.get_origin(annotation) in (list, tuple, set, frozenset):
        return True
    return any(_repeats(arg) for arg in typing.get_args(annotation) if arg is not type(None))


M = TypeVar("M", bound=BaseModel)


class QueryString(Generic[M]):
    """Parses `request.query_params` into `model` the way FastAPI's `Annotated[Model, Query()]` does: a repeating
    field takes every value, any other the last one; errors are the same RequestValidationError, so the same
    envelope (`validation_error`, `<field>: <message>`)."""

    def __init__(self, model: type[M], aliases: dict[str, str] | None = None) -> None:
        """`aliases`: other names a parameter is accepted under (the product documents' names,
        docs/api-contract.md), each mapped to the parameter's own name. A repeating parameter is also accepted as
        `name[]`."""
        self.model = model
        self.repeating = frozenset(
            name
            for field_name, field in model.model_fields.items()
            if _repeats(field.annotation)
            for name in (field.alias or field_name, field_name)
        )
        self.aliases = dict(aliases or {})
        for name in sorted(self.repeating):
            self.aliases.setdefault(f"{name}[]", name)
        for alias, target in list(self.aliases.items()):
            if target in self.repeating and not alias.endswith("[]"):
                self.aliases.setdefault(f"{alias}[]", target)

    def parse(self, request: Request) -> M:
        values: dict[str, Any] = {}
        aliases = self.aliases
        for name, value in request.query_params.multi_items():
            name = aliases.get(name, name)
            if name in self.repeating:
                values.setdefault(name, []).append(value)
            else:
                values[name] = value
        try:
            return self.model.model_validate(values)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None

    def openapi(self) -> dict[str, Any]:
        """`openapi_extra` for the route: one query parameter per field, as FastAPI documents a query model."""
        schema = self.model.model_json_schema(mode="validation")
        properties: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        parameters = []
        for name, prop in properties.items():
            parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if "description" in prop:
                parameter["description"] = prop["description"]
            parameters.append(parameter)
        for alias, target in self.aliases.items():
            if target in properties:
                description = f"the same as `{target}` (an alias)"
                parameters.append({"name": alias, "in": "query", "required": False, "schema": properties[target],
                                   "description": description})  # fmt: skip
        return {"parameters": parameters}
