"""The tenant secrets store (docs/secrets.md): write (create or rotate), list and delete named secrets.

Admin scope, the key's tenant and environment only (a TESTING key sees TESTING secrets). Values are encrypted
before they reach PostgreSQL (services/common/crypto.py) and never returned: answers carry the name, version
and when the value was created and last written. Steps use a secret as `{{ secrets.NAME }}` in their input; the
executor reads it when the step runs.
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from services.api.models.secrets import SecretList, SecretView
from services.api.routes import Admin
from services.common.contract import ErrorEnvelope
from services.common.http import ApiError
from services.common.secretstore import (
    MAX_VALUE_CHARS,
    NAME_PATTERN,
    delete_secret,
    keyring_of,
    list_secrets,
    put_secret,
)

router = APIRouter()
SecretName = Annotated[
    str,
    Path(pattern=NAME_PATTERN, description="letters, digits and `_`, not starting with a digit (a JMESPath name)"),
]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "malformed request: bad JSON, a NUL byte or lone surrogate in a path, query, header or body",
        401: "missing, invalid, expired or revoked API key",
        403: "the key lacks the admin scope",
        404: "no secret of that name in the key's tenant and environment",
        422: "a bad name or value (the message names it)",
        429: "rate limit exceeded; retry after `Retry-After` seconds",
    }
    return {s: {"model": ErrorEnvelope, "description": described[s]} for s in (400, 401, 403, 422, 429, *statuses)}


class SecretValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(min_length=1, max_length=MAX_VALUE_CHARS, description="stored encrypted, never shown again")


def _view(row: asyncpg.Record) -> SecretView:
    return SecretView(
        name=row["name"],
        environment=row["environment"],
        version=row["version"],
        created_at=row["created_at"],
        last_rotated_at=row["last_rotated_at"],
        reference=f"{{{{ secrets.{row['name']} }}}}",
    )


@router.put(
    "/v1/secrets/{name}",
    response_model=SecretView,
    status_code=201,
    responses={200: {"model": SecretView, "description": "an existing secret rotated to the new value"}, **_errors()},
)
async def put_secret_route(
    name: SecretName, body: SecretValue, request: Request, response: Response, principal: Admin
) -> SecretView:
    """Create the secret (201) or rotate it to a new value (200: `version` + 1, `last_rotated_at` now). Runs that
    start a step after this read the new value."""
    keyring = keyring_of(request.app.state, request.app.state.settings)
    async with request.app.state.pool.acquire() as conn:
        row, created = await put_secret(conn, keyring, principal.tenant_id, principal.environment, name, body.value)
    if not created:
        response.status_code = 200
    return _view(row)


@router.get("/v1/secrets", response_model=SecretList, responses=_errors())
async def list_secrets_route(request: Request, principal: Admin) -> SecretList:
    """The key's tenant's secrets in its environment, by name; names and dates only."""
    rows = await list_secrets(request.app.state.pool, principal.tenant_id, principal.environment)
    return SecretList(data=[_view(r) for r in rows])


@router.get("/v1/secrets/{name}", response_model=SecretView, responses=_errors(404))
async def get_secret_route(name: SecretName, request: Request, principal: Admin) -> SecretView:
    rows = await list_secrets(request.app.state.pool, principal.tenant_id, principal.environment)
    for row in rows:
        if row["name"] == name:
            return _view(row)
    raise ApiError(404, "not_found", f"no secret named {name!r}")


@router.delete("/v1/secrets/{name}", status_code=204, response_class=Response, responses=_errors(404))
async def delete_secret_route(name: SecretName, request: Request, principal: Admin) -> Response:
    """Steps referencing it fail from their next start with `secret_not_found`."""
    if not await delete_secret(request.app.state.pool, principal.tenant_id, principal.environment, name):
        raise ApiError(404, "not_found", f"no secret named {name!r}")
    return Response(status_code=204)
