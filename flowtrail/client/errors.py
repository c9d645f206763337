"""What a call to Flowtrail raises: the API's error envelope `{"error": {"code", "message", "request_id"}}`
(docs/api-contract.md, Errors) as one exception class per status, and the failures that have no answer at all."""

from __future__ import annotations

from typing import Any

import httpx


class FlowtrailError(Exception):
    """An answer of 400 or more, or no answer. `status`, `code`, `message` and `request_id` are the API's own (the
    request id is the one its logs carry); `details` its machine-readable facts, when it gave any; `retry_after`
    the seconds the API asked to wait (429, 503) when the client gave up retrying."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "",
        request_id: str | None = None,
        details: Any = None,
        method: str = "",
        url: str = "",
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details
        self.method = method
        self.url = url
        self.retry_after = retry_after
        self.attempts = attempts

    def __str__(self) -> str:
        reason = f"{self.code}: {self.message}" if self.code else self.message
        where = f"{self.method} {self.url}".strip()
        said = f"{where} answered {self.status} {reason}" if self.status is not None else f"{where}: {reason}"
        return f"{said} (request {self.request_id})" if self.request_id else said


class BadRequest(FlowtrailError):
    """400 `invalid_request` (also 405 and 415)."""


class Unauthorized(FlowtrailError):
    """401: no key, or one the API does not know."""


class Forbidden(FlowtrailError):
    """403: the key lacks the scope, or asks for another tenant's or environment's data."""


class NotFound(FlowtrailError):
    """404: no such run, flow, tenant, ... for this key."""


class Conflict(FlowtrailError):
    """409: the action does not apply in the current state (a run that ended, a paused flow, ...)."""


class PayloadTooLarge(FlowtrailError):
    """413."""


class ValidationFailed(FlowtrailError):
    """422 `validation_error` (and `idempotency_key_reused`): the message names the field."""


class RateLimited(FlowtrailError):
    """429 after the retries the policy allows: `retry_after` says when the key may call again."""


class ServerError(FlowtrailError):
    """500 or another 5xx."""


class ServiceUnavailable(ServerError):
    """503 after the retries the policy allows (Kafka or PostgreSQL away; safe to retry with the same
    Idempotency-Key)."""


class FlowtrailConnectionError(FlowtrailError):
    """No answer: the connection failed or timed out (after the retries allowed for the request). `__cause__` is
    httpx's exception."""


class WaitTimeout(FlowtrailError, TimeoutError):
    """`wait` gave up before the run ended; `run` is its detail as last seen (None when it was never visible)."""

    def __init__(self, message: str, run: Any = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.run = run


_BY_STATUS: dict[int, type[FlowtrailError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: BadRequest,
    409: Conflict,
    413: PayloadTooLarge,
    415: BadRequest,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_from(response: httpx.Response, retry_after: float | None = None, attempts: int = 1) -> FlowtrailError:
    """The exception for an error answer (its body read): the envelope's fields, or the body's first 500
    characters as the message when it is not one (a proxy's page)."""
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else FlowtrailError)
    code, message, request_id, details = "", response.text[:500], response.headers.get("x-request-id"), None
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        request_id, details = error.get("request_id") or request_id, error.get("details")
    except (ValueError, KeyError, TypeError):
        pass
    return kind(
        message,
        status=status,
        code=code,
        request_id=request_id,
        details=details,
        method=response.request.method,
        url=str(response.request.url),
        retry_after=retry_after,
        attempts=attempts,
    )
