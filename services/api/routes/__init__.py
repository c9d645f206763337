"""The API's routes, one module a resource, and the callers they admit: each scope's dependency, declared once."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends

from services.common.auth import Principal, require_scope
from services.common.http import ApiError

Reader = Annotated[Principal, Depends(require_scope("runs:read"))]
RunsWriter = Annotated[Principal, Depends(require_scope("runs:write"))]
FlowsWriter = Annotated[Principal, Depends(require_scope("flows:write"))]
DataReader = Annotated[Principal, Depends(require_scope("data:read"))]
Admin = Annotated[Principal, Depends(require_scope("admin"))]

R = TypeVar("R")


def found(row: R | None, what: str, ident: str) -> R:
    """The row a route looked up, or the 404 answer naming what it asked for (`no run with id 'x'`)."""
    if row is None:
        raise ApiError(404, "not_found", f"no {what} with id {ident!r}")
    return row
