"""HTTP pieces every FastAPI service shares: request ids, the error envelope, /healthz and /metrics."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HTTP_SECONDS = Histogram(
    "flowtrail_http_request_seconds", "HTTP request latency by service, method, route template and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)  # fmt: skip

# Seed 003's codes, by HTTP status.
CODE_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "invalid_request",
    409: "conflict",
    413: "invalid_request",
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


class ApiError(Exception):
    """Raise anywhere in a request: it becomes the error envelope with this status and code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "")


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> OrjsonResponse:
    rid = request_id(request)
    return OrjsonResponse(
        {"error": {"code": code, "message": message, "request_id": rid}},
        status_code=status,
        headers={**(headers or {}), "X-Request-Id": rid},
    )


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
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else "req_" + secrets.token_urlsafe(9)
        scope.setdefault("state", {})["request_id"] = rid
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


def install(app: FastAPI) -> None:
    """Request ids, error envelope handlers, /healthz and /metrics."""

    app.add_middleware(RequestIdMiddleware, service=app.title.split()[-1].lower())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> OrjsonResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> OrjsonResponse:
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
            return error_response(request, 400, "invalid_request", f"malformed JSON: {first.get('msg')}")
        where = _field_path(tuple(first.get("loc", ())))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(request, 422, "validation_error", f"{where}: {first.get('msg')}{more}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> OrjsonResponse:
        log.exception("request %s failed: %s %s", request_id(request), request.method, request.url.path)
        return error_response(request, 500, "internal_error", "internal error; safe to retry with backoff")

    @app.get("/healthz", include_in_schema=False)
    async def _healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
