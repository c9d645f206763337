"""The API's answers as pydantic models, one module a resource: the typed contract of /openapi.json
(docs/api-contract.md).

Every route returns one of these (or declares it as its `response_model`), so FastAPI checks the answer and
serialises it; the contract tests (tests/e2e/test_contract.py) hold the running API to the document.

Objects are closed (`additionalProperties: false`) except where the data is the caller's own and free-form:
trigger payloads, step inputs and outputs, errors' details, flow definitions, canonical records' fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

JSON = Any  # a free-form JSON value: the caller's payloads, a step's input or output, an error's details


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """An object whose fields are the caller's data (extra fields are part of the answer)."""

    model_config = ConfigDict(extra="allow")
