"""HTTP pieces every FastAPI service shares: request ids, the error envelope, /healthz and /metrics."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.appender import AppendFailed
from services.common.contract import document

log = logging.getLogger(__name__)

HTTP_SECONDS = Histogram(
    "flowtrail_http_request_seconds", "HTTP request latency by service, method, route template and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)  # fmt: skip

# The error codes by HTTP status (docs/api-contract.md, Errors).
CODE_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "invalid_request",
    409: "conflict",
    413: "payload_too_large",
    415: "invalid_request",
    422: "validation_error",
    429: "rate_limited",
}


class OrjsonResponse(JSONResponse):
    """JSON through orjson, written as FastAPI writes a returned dict (UTC times end in `Z`).

    FastAPI's ORJSONResponse is deprecated and warns (a `warnings.warn` call) each time one is built; routes on a
    hot path build this one and return it, which also skips FastAPI's own pass over the value (pydantic's
    `dump_python`), as costly as the encoding itself.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z)


def answer(model: BaseModel, status_code: int) -> Response:
    """A declared model answered under another status than the route's own, with another model (a 202 that is
    still pending beside a 201, a 200 for what was done already beside a 202): serialised as FastAPI serialises
    the route's own answer (pydantic, fields left unset left out). The route documents it in `responses`."""
    body = model.model_dump_json(exclude_unset=True)
    return Response(body, status_code=status_code, media_type="application/json")


class ApiError(Exception):
    """Raise anywhere in a request: it becomes the error envelope with this status and code."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        # Machine-readable facts about the failure (which inputs were appended…), under `error.details`.
        self.details = details


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "")


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> OrjsonResponse:  # fmt: skip
    rid = request_id(request)
    error: dict[str, Any] = {"code": code, "message": message, "request_id": rid}
    if details is not None:
        error["details"] = details
    return OrjsonResponse(
        {"error": error},
        status_code=status,
        headers={**(headers or {}), "X-Request-Id": rid},
    )


# ---------------------------------------------------------------- input that must never reach PostgreSQL or Kafka
#
# PostgreSQL refuses NUL in text (and asyncpg any string that is not valid UTF-8, such as a lone surrogate); orjson
# refuses integers outside 64 bits. RequestIdMiddleware notes such input here (path, query, headers, JSON body);
# the authentication dependency raises it once the key is known (401 and the rate limit come first).

BAD_INPUT = "bad_input"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# `\\` pairs are matched too, so that an escaped backslash followed by `u0000` is not taken for an escape.
_ESCAPES = re.compile(rb"\\\\|\\u(0000|[dD][89abAB][0-9a-fA-F]{2}|[dD][c-fC-F][0-9a-fA-F]{2})")
# Digits become `0` and `E` becomes `e`, so plain substring searches (C speed) find the rare bodies worth parsing.
_NUMBERS = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_DIGITS = b"0" * 19


def _escape_problem(body: bytes) -> str | None:
    high_end = -1  # where the last unpaired high surrogate escape ended
    for m in _ESCAPES.finditer(body):
        if high_end >= 0 and m.start() != high_end:
            return "a lone surrogate (\\ud800-\\udbff without its low half)"
        code = m.group(1)
        if code is None:
            continue
        value = int(code, 16)
        if value == 0:
            return "a NUL character (\\u0000)"
        if value < 0xDC00:
            if high_end >= 0:
                return "a lone surrogate (\\ud800-\\udbff without its low half)"
            high_end = m.end()
        elif high_end < 0:
            return "a lone surrogate (\\udc00-\\udfff without its high half)"
        else:
            high_end = -1
    return "a lone surrogate (\\ud800-\\udbff without its low half)" if high_end >= 0 else None


class _OutOfRange(ValueError):
    pass


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise _OutOfRange(f"the number {text[:40]} does not fit in 64 bits")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _OutOfRange(f"the number {text[:40]} is out of range")
    return value


def _constant(text: str) -> float:
    raise _OutOfRange(f"{text} is not a JSON number")


def _number_problem(body: bytes) -> str | None:
    try:
        json.loads(body, parse_int=_int64, parse_float=_finite, parse_constant=_constant)
    except _OutOfRange as exc:
        return str(exc)
    except ValueError:
        return None  # malformed JSON: FastAPI's own parse reports it
    return None


def body_problem(body: bytes) -> tuple[int, str, str] | None:
    """Why a JSON body must not be accepted, or None. Cheap for ordinary bodies (a few substring searches)."""
    if b"\\u" in body and (problem := _escape_problem(body)) is not None:
        return 400, "invalid_request", f"body: {problem} is not accepted in JSON strings"
    if b"NaN" in body or b"Infinity" in body:
        if (problem := _number_problem(body)) is not None:
            return 422, "validation_error", f"body: {problem}"
    shape = body.translate(_NUMBERS)
    if _LONG_DIGITS in shape or b"e000" in shape or b"e+000" in shape:
        if (problem := _number_problem(body)) is not None:
            return 422, "validation_error", f"body: {problem}; integers must fit in 64 bits"
    return None


def _checked_body(scope: Scope, receive: Receive) -> Receive:
    """`receive` that inspects the whole body once the application has read it (routes without a body never do)."""
    chunks: list[bytes] = []

    async def checked() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False) and chunks:
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                problem = body_problem(body)
                if problem is not None:
                    scope["state"].setdefault(BAD_INPUT, problem)
        return message

    return checked


def raise_bad_input(request: Request) -> None:
    """Raises what RequestIdMiddleware found wrong with the request's bytes (called after authentication)."""
    problem = request.scope.get("state", {}).get(BAD_INPUT)
    if problem is not None:
        raise ApiError(*problem)


def _documented_query(app: Any) -> dict[tuple[str, str], frozenset[str]]:
    names: dict[tuple[str, str], frozenset[str]] = {}
    for path, operations in app.openapi().get("paths", {}).items():
        for method, operation in operations.items():
            if isinstance(operation, dict):
                params = operation.get("parameters", [])
                names[(path, method.upper())] = frozenset(p["name"] for p in params if p.get("in") == "query")
    return names


def check_query_names(request: Request) -> None:
    """422 naming every query parameter the route's OpenAPI does not document (GET and HEAD routes).

    The documented names (aliases included) are read from the app's own OpenAPI once per process."""
    if request.method not in ("GET", "HEAD") or not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return
    state = request.app.state
    documented = getattr(state, "documented_query", None)
    if documented is None:
        documented = state.documented_query = _documented_query(request.app)
    accepted = documented.get((path, "GET"))
    if accepted is None:
        return
    unknown = sorted({name for name in request.query_params if name not in accepted})
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        plural = "s" if len(unknown) > 1 else ""
        message = f"unknown query parameter{plural} {names}; accepted: {', '.join(sorted(accepted)) or 'none'}"
        raise ApiError(422, "validation_error", message)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p not in ("body", "query", "path", "header")) or "<root>"


class RequestIdMiddleware:
    """Gives every request an id (the caller's `X-Request-Id` if sane) and echoes it on the response.

    Plain ASGI rather than `@app.middleware("http")`, whose per-request task and stream wrapping cost
    more than the rest of a cached read.
    """

    def __init__(self, app: ASGIApp, service: str = "http") -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        bad: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
            if b"\x00" in value:
                bad = f"header {name.decode('latin-1')}: a NUL byte is not accepted"
        rid = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else "req_" + secrets.token_urlsafe(9)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        query = scope["query_string"]
        if query and (b"%00" in query or b"\x00" in query):
            bad = "query string: a NUL byte (%00) is not accepted"
        if "\x00" in scope["path"]:
            bad = "path: a NUL byte (%00) is not accepted"
        if bad is not None:
            state[BAD_INPUT] = (400, "invalid_request", bad)
        if scope["method"] in _BODY_METHODS:
            receive = _checked_body(scope, receive)
        header = (b"x-request-id", rid.encode("latin-1"))

        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The route template, not the path: one series per endpoint, not per run id.
            route = getattr(scope.get("route"), "path", "<unmatched>")
            HTTP_SECONDS.labels(self.service, scope["method"], route, str(status)).observe(
                time.perf_counter() - started
            )


DATABASE_DOWN: tuple[type[Exception], ...] = (
    ConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
)


def install(app: FastAPI, ready: Callable[[], Awaitable[dict[str, str | None]]] | None = None) -> None:
    """Request ids, error envelope handlers, /healthz, /readyz and /metrics.

    `ready` names each dependency the service needs to do its job with None when it is fine, else the problem:
    /readyz answers 503 while any has one (/healthz stays liveness: the process answers).
    """

    app.add_middleware(RequestIdMiddleware, service=app.title.split()[-1].lower())

    def openapi() -> dict[str, Any]:
        """FastAPI's document, completed with the contract (bearer scheme, ErrorEnvelope errors), built once."""
        if app.openapi_schema is None:
            document(app.routes, FastAPI.openapi(app))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> OrjsonResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers, exc.details)

    async def _refused_first(request: Request) -> OrjsonResponse | None:
        """FastAPI parses a JSON body before any dependency runs: the key is checked (401) and the request counted
        (rate-limit headers, 429) before a body error is answered, as for every other input error."""
        if getattr(request.app.state, "authenticator", None) is None or request.scope.get("route") is None:
            return None
        from services.common.auth import authenticate

        try:
            await authenticate(request)
        except ApiError as exc:
            return error_response(request, exc.status, exc.code, exc.message, exc.headers)
        return None

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        if exc.status_code == 400 and (refused := await _refused_first(request)) is not None:
            return refused
        code = CODE_BY_STATUS.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "invalid_request")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> OrjsonResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid input", "type": ""}
        if first.get("type") == "json_invalid":
            if (refused := await _refused_first(request)) is not None:
                return refused
            return error_response(request, 400, "invalid_request", f"malformed JSON: {first.get('msg')}")
        where = _field_path(tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(request, 422, "validation_error", f"{where}: {first.get('msg')}{more}")

    @app.exception_handler(AppendFailed)
    async def _append_failed(request: Request, exc: AppendFailed) -> OrjsonResponse:
        if exc.nothing_appended:
            message = f"Kafka could not take the request ({exc.reason}); nothing was appended: it is safe to retry"
        else:
            message = (f"Kafka took the request only in part ({exc.reason}); retry with the same Idempotency-Key "
                       "to complete it")  # fmt: skip
        return error_response(request, 503, "kafka_unavailable", message, {"Retry-After": "2"})

    async def _database_unavailable(request: Request, exc: Exception) -> OrjsonResponse:
        log.warning("request %s: PostgreSQL unavailable: %r", request_id(request), exc)
        return error_response(request, 503, "database_unavailable",
                              "PostgreSQL is unavailable; nothing was changed: retry after a moment",
                              {"Retry-After": "2"})  # fmt: skip

    # A database outage is the service's condition, not the client's fault nor a bug: 503, not 500.
    for exc_class in DATABASE_DOWN:
        app.add_exception_handler(exc_class, _database_unavailable)  # type: ignore[arg-type]

    @app.exception_handler(KafkaError)
    async def _kafka_error(request: Request, exc: KafkaError) -> OrjsonResponse:
        return error_response(request, 503, "kafka_unavailable",
                              f"Kafka is unavailable ({exc!r}); it is unknown whether the write took effect: retry "
                              "with the same Idempotency-Key", {"Retry-After": "2"})  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> OrjsonResponse:
        log.exception("request %s failed: %s %s", request_id(request), request.method, request.url.path)
        # Whether the request took effect is unknown here: only a retry with the same Idempotency-Key is safe.
        message = ("internal error; it is unknown whether the request took effect: retry with the same "
                   "Idempotency-Key (a retry without one may repeat it)")  # fmt: skip
        return error_response(request, 500, "internal_error", message)

    @app.get("/healthz", include_in_schema=False)
    async def _healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def _readyz() -> OrjsonResponse:
        checks = await ready() if ready is not None else {}
        ok = all(problem is None for problem in checks.values())
        body = {"status": "ready" if ok else "unavailable", "checks": {k: v or "ok" for k, v in checks.items()}}
        return OrjsonResponse(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "5"})

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
