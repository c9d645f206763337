"""Request body size limit for every FastAPI service, enforced before the body is read or parsed (invariant 8).

A declared Content-Length over the limit is refused at once; a body sent without one (chunked) is counted as it
arrives and refused the moment it passes the limit, so no client can make a service buffer more than the limit.
A service may give the routes that start runs (the "triggers" rate-limit class) a limit of their own: the API takes
ingest's trigger bodies at its base URL (docs/decisions.md).
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.ratelimit import classify


async def send_error(
    scope: Scope, send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """The error envelope from plain ASGI code, with the request id RequestIdMiddleware gave the request."""
    rid = str(scope.get("state", {}).get("request_id", ""))
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": rid}})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reading lets it through as a 413 (not its generic 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


def _refusal(max_bytes: int) -> str:
    return f"the request body is larger than {max_bytes:,} bytes; send fewer or smaller inputs per request"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, trigger_max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.trigger_max_bytes = trigger_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.max_bytes
        if self.trigger_max_bytes is not None and classify(scope["method"], scope["path"]) == "triggers":
            max_bytes = self.trigger_max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(scope, send, 400, "invalid_request", "Content-Length is not a number")
                    return
                if declared > max_bytes:
                    await send_error(scope, send, 413, "payload_too_large", _refusal(max_bytes))
                    return
                break
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _TooLarge(_refusal(max_bytes))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(scope, send, 413, "payload_too_large", _refusal(max_bytes))
