"""The one implementation of every call, shared by `Client` and `AsyncClient`: a call is a *plan*, a generator
that yields what it needs done (send a request, sleep, read a line of a stream, hand an item to the caller) and
is told the result. It holds request building, retry with backoff, error mapping, paging and stream decoding; a
driver (flowtrail/client/drivers.py) does the input and output, blocking or with asyncio. docs/client.md says
what the retries and idempotency keys promise.
"""

from __future__ import annotations

import email.utils
import random
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

import httpx
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from flowtrail.client.errors import FlowtrailConnectionError, error_from

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of a listing
M = TypeVar("M", bound=BaseModel)

# ---------------------------------------------------------------- what a plan asks its driver to do


@dataclass(frozen=True, slots=True)
class Send:
    """Send the request; the answer is the response (its body read, unless `stream`), or httpx's TransportError
    is thrown into the plan."""

    request: httpx.Request
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Emit:
    """One item for the caller of a listing or a stream."""

    value: Any


@dataclass(frozen=True, slots=True)
class Read:
    """Read a streamed response's whole body (an error answer)."""

    response: httpx.Response


@dataclass(frozen=True, slots=True)
class NextLine:
    """The next line of a streamed response's body, None at its end (or httpx's TransportError thrown in)."""

    response: httpx.Response


@dataclass(frozen=True, slots=True)
class Close:
    response: httpx.Response


Op = Send | Sleep | Emit | Read | NextLine | Close
Plan = Generator[Op, Any, T]


@dataclass(frozen=True, slots=True)
class Items(Generic[I]):
    """A listing or a stream: the plan that emits its items (the drivers iterate it)."""

    plan: Plan[None]


# ---------------------------------------------------------------- retries


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True)
class RetryPolicy:
    """When a call is sent again (docs/client.md, Retries).

    - `statuses` (429 and 503): retried after the answer's `Retry-After` (seconds or an HTTP date), else after the
      backoff. A 503 only for a request that is idempotent or carries an Idempotency-Key; a 429 always (the API
      refused it before doing anything).
    - A connection failure or timeout: only for an idempotent request or one with an Idempotency-Key.
    - At most `max_attempts` sends in all, and no retry whose wait would end more than `max_total_s` after the
      first send; the backoff doubles from `backoff_s` up to `max_backoff_s`, with jitter.
    """

    max_attempts: int = 5
    max_total_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    statuses: frozenset[int] = frozenset({429, 503})

    def backoff(self, attempt: int) -> float:
        """The wait after send number `attempt` failed: between half and all of the doubled delay."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return delay / 2 + random.random() * delay / 2

    def wait(self, attempt: int, started: float, asked: float | None) -> float | None:
        """How long to wait before send number `attempt + 1`, or None when the policy says stop."""
        delay = asked if asked is not None else self.backoff(attempt)
        if attempt >= self.max_attempts or time.monotonic() - started + delay > self.max_total_s:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_after(response: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds (a number or an HTTP date), None without a usable one."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (at - datetime.now(UTC)).total_seconds())


# ---------------------------------------------------------------- requests


def new_idempotency_key() -> str:
    return f"ftc_{uuid.uuid4().hex}"


_NO_BODY: Any = object()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request described: where, what, how its answer is read (`parse`), and what makes it safe to retry."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    body: Any = _NO_BODY
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    service: Literal["api", "ingest"] = "api"
    stream: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class Context:
    """What every request of one client shares: the base URLs, the key, headers, the retry policy and timeout."""

    api_url: str
    ingest_url: str
    api_key: str | None
    headers: Mapping[str, str]
    retry: RetryPolicy
    timeout_s: float

    def request(self, call: Call[Any]) -> httpx.Request:
        base = self.ingest_url if call.service == "ingest" else self.api_url
        headers = {**self.headers, **call.headers}
        if self.api_key:
            headers.setdefault("Authorization", f"Bearer {self.api_key}")
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        timeout = httpx.Timeout(call.timeout_s if call.timeout_s is not None else self.timeout_s)
        return httpx.Request(
            call.method,
            base + call.path,
            params=query(call.params),
            headers=headers,
            json=None if call.body is _NO_BODY else to_jsonable_python(call.body),
            extensions={"timeout": timeout.as_dict()},
        )


def query(params: Mapping[str, Any] | None) -> httpx.QueryParams:
    """A query string from keyword values: None left out, a list as the name repeated, times as RFC 3339,
    booleans as `true`/`false`."""
    pairs: list[tuple[str, str | int | float | bool | None]] = []
    for name, value in (params or {}).items():
        for one in value if isinstance(value, list | tuple | set | frozenset) else [value]:
            if one is None:
                continue
            if isinstance(one, bool):
                text = "true" if one else "false"
            elif isinstance(one, datetime):
                text = one.isoformat()
            else:
                text = str(one)
            pairs.append((name, text))
    return httpx.QueryParams(pairs)


# ---------------------------------------------------------------- answers


def model(kind: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        return kind.model_validate_json(response.content)

    return parse


def by_status(kinds: Mapping[int, type[BaseModel]]) -> Callable[[httpx.Response], Any]:
    """An answer whose model depends on its status (201 projected, 202 pending; 202 requested, 200 done already)."""

    def parse(response: httpx.Response) -> Any:
        return kinds[response.status_code].model_validate_json(response.content)

    return parse


def nothing(response: httpx.Response) -> None:
    return None


def raw(response: httpx.Response) -> httpx.Response:
    return response


# ---------------------------------------------------------------- the plans


def exchange(ctx: Context, call: Call[Any]) -> Plan[tuple[httpx.Response, int]]:
    """Send the call, again as `ctx.retry` allows; the final answer (any status) and how many sends it took."""
    request = ctx.request(call)
    safe = request.method in IDEMPOTENT_METHODS or call.idempotency_key is not None
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            response = yield Send(request, call.stream)
        except httpx.TransportError as exc:
            delay = ctx.retry.wait(attempt, started, None) if safe else None
            if delay is None:
                raise FlowtrailConnectionError(
                    f"{exc!r}", method=request.method, url=str(request.url), attempts=attempt
                ) from exc
        else:
            status = response.status_code
            if status not in ctx.retry.statuses or not (safe or status == 429):
                return response, attempt
            delay = ctx.retry.wait(attempt, started, retry_after(response))
            if delay is None:
                return response, attempt
            if call.stream:
                yield Close(response)
        yield Sleep(delay)


def result(ctx: Context, call: Call[T]) -> Plan[T]:
    """The call's parsed answer, or its error raised (after the retries the policy allows)."""
    response, attempts = yield from exchange(ctx, call)
    if response.status_code >= 400:
        if call.stream:
            yield Read(response)
        raise error_from(response, retry_after(response), attempts)
    return call.parse(response)


def pages(
    ctx: Context, first: Call[T], items: Callable[[T], Sequence[Any]], following: Callable[[T], Call[T] | None]
) -> Plan[None]:
    """Every item of every page, from `first` on, each page's `following` call until there is none."""
    call: Call[T] | None = first
    while call is not None:
        page = yield from result(ctx, call)
        for item in items(page):
            yield Emit(item)
        call = following(page)


# ---------------------------------------------------------------- Server-Sent Events


@dataclass
class ServerEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None


class SSEDecoder:
    """Lines of a `text/event-stream` body into events (the WHATWG event-stream format: `field: value` lines, a
    blank line ends an event, `:` starts a comment such as a keep-alive ping)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> ServerEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            done = ServerEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return done
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def server_events(
    ctx: Context, call: Call[Any], resume: Callable[[Call[Any], str], Call[Any]], decode: Callable[[ServerEvent], Any]
) -> Plan[None]:
    """Each event of an event stream, emitted as `decode` reads it, until the server ends the stream. A connection that
    drops mid-stream is opened again with `resume(call, last event id)` (the API's `Last-Event-ID`), as often as
    the retry policy allows in a row."""
    failures, started, last_id = 0, time.monotonic(), None
    while True:
        response = yield from result(ctx, call)
        decoder = SSEDecoder()
        while True:
            try:
                line = yield NextLine(response)
            except httpx.TransportError as exc:
                yield Close(response)
                failures += 1
                delay = ctx.retry.wait(failures, started, None)
                if delay is None:
                    raise FlowtrailConnectionError(
                        f"{exc!r}", method="GET", url=str(response.request.url), attempts=failures
                    ) from exc
                yield Sleep(delay)
                if last_id is not None:
                    call = resume(call, last_id)
                break
            if line is None:
                yield Close(response)
                return
            event = decoder.feed(line)
            if event is not None:
                failures, started, last_id = 0, time.monotonic(), event.id or last_id
                yield Emit(decode(event))
