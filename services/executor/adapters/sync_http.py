"""`sync_records` over HTTP: reading a source's pages and writing records one request each, every hop guarded.

A destination 5xx (or 408/429) on one record's write fails the whole step as TRANSIENT instead of listing the
record: it says the destination is down or throttling, not that the record is wrong, so the records after it would
fail the same way, and a PARTIAL run would ask a human to retry what a backoff retry fixes. The records written
before it are repeated on the retry: an HTTP write carries `Idempotency-Key: <run>:<step>:<record key>` — the same
for every attempt of the step, so a destination that honours the header takes each record of a run once however
often the step is retried.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jmespath
import orjson
from jmespath.exceptions import JMESPathError

from schemas.events import ErrorCategory
from schemas.flows import mask_text
from services.common.failures import masked_message
from services.common.netguard import BlockedAddress, UnresolvableHost, check_url
from services.executor.adapters.actions_base import StepCall, StepError
from services.executor.adapters.connectors import ConnectorRegistry
from services.executor.sync import (
    HTTP_SCHEMES,
    MAX_REDIRECTS,
    Endpoint,
    HttpDestination,
    HttpSource,
    SyncRecordsInput,
    key_text,
)
from services.executor.sync_errors import error_field_path, error_message, http_category, raw_http_error, too_many
from services.executor.sync_mapping import Prepared, Progress


class HttpEnds:
    """Reads an HTTP source and writes an HTTP destination. URLs written in flows go through the guarded client
    (resolved once, checked, pinned); a connector's own origin through a plain one: the operator configured it."""

    def __init__(self, connectors: ConnectorRegistry, http: httpx.AsyncClient, trusted_http: httpx.AsyncClient) -> None:
        self.connectors = connectors
        self.http = http
        self.trusted_http = trusted_http

    async def _base(self, endpoint: Endpoint, call: StepCall) -> tuple[str, str | None, dict[str, str]]:
        """The URL, the trusted origin of an operator-configured connector (private or not; a tenant's own connector
        is guarded like a flow's URL) and the connector's headers (the endpoint's own override them)."""
        if endpoint.connector is None:
            assert endpoint.url is not None
            return endpoint.url, None, {}
        connector = await self.connectors.resolve(call.tenant_id, call.environment, endpoint.connector,
                                                  HTTP_SCHEMES, "http")  # fmt: skip
        base = connector.url
        url = (base.rstrip("/") + endpoint.path) if endpoint.path else base
        return url, _origin(base) if connector.trusted else None, connector.headers

    async def _guard(self, url: str, trusted: str | None) -> httpx.AsyncClient:
        """The client for `url`: the connector's own origin is trusted (the operator configured it, private or
        not); any other URL (a flow's, or where a redirect leads) has its scheme and host checked here and its
        address where it connects (the guarded client), so no hop reaches a private network."""
        if trusted is not None and _origin(url) == trusted:
            return self.trusted_http
        try:
            await check_url(url, allow_private=True)  # the URL's form only: nothing is resolved twice
        except BlockedAddress as exc:
            raise StepError(ErrorCategory.VALIDATION, str(exc), code="blocked_address") from exc
        return self.http

    async def _request(
        self, method: str, url: str, trusted: str | None, *, timeout_s: float, **kw: Any
    ) -> httpx.Response:
        """One request, its redirects followed (a GET only) and every hop guarded; network errors are TRANSIENT."""
        for _ in range(MAX_REDIRECTS + 1):
            client = await self._guard(url, trusted)
            try:
                response = await client.request(method, url, timeout=timeout_s, **kw)
            except BlockedAddress as exc:
                raise StepError(ErrorCategory.VALIDATION, str(exc), code="blocked_address") from exc
            except UnresolvableHost as exc:
                raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="unresolvable_host") from exc
            except httpx.TransportError as exc:
                raise StepError(ErrorCategory.TRANSIENT, f"{method} {mask_text(url)}: {masked_message(exc)}",
                                code="network") from exc  # fmt: skip
            if not response.is_redirect or method != "GET" or response.next_request is None:
                return response
            url = str(response.next_request.url)
            kw.pop("params", None)  # the Location carries its own query
        raise StepError(ErrorCategory.VALIDATION, f"GET {mask_text(url)}: too many redirects", code="redirects")

    async def read(self, source: HttpSource, spec: SyncRecordsInput, call: StepCall) -> list[Any]:
        url, trusted, defaults = await self._base(source, call)
        bounds = spec.read_window()
        window: dict[str, str] = {}
        if source.updated_since_param and bounds.updated_since:
            window[source.updated_since_param] = bounds.updated_since
        if source.updated_until_param and bounds.updated_until:
            window[source.updated_until_param] = bounds.updated_until
        params: dict[str, Any] | None = {**source.params, **window}
        timeout = min(source.timeout_s or call.timeout_s, call.timeout_s)
        records: list[Any] = []
        seen: set[str] = set()
        for page in range(1, source.max_pages + 1):
            response = await self._request(
                "GET", url, trusted, timeout_s=timeout, params=params, headers={**defaults, **source.headers}
            )
            body = _source_body(response, url)
            found = _search_or_fail(source.records_path, body, "source.records_path")
            if found is not None and not isinstance(found, list):
                raise StepError(ErrorCategory.VALIDATION, f"source.records_path `{source.records_path}` gave a "
                                f"{type(found).__name__}, not a list", field_path="source.records_path")  # fmt: skip
            records += found or []
            if len(records) > spec.max_records:
                raise too_many(spec.max_records)
            following = (
                _search_or_fail(source.next_page_path, body, "source.next_page_path") if source.next_page_path else None
            )
            if following in (None, "", False):
                return records
            marker = key_text(following)
            if marker in seen:
                raise StepError(ErrorCategory.VALIDATION, f"page {page} points back to an earlier page ({marker!r})",
                                code="pagination_loop", field_path="source.next_page_path")  # fmt: skip
            seen.add(marker)
            if marker.startswith(("http://", "https://")):
                url, params = marker, None  # the source's own link carries what it needs
            else:
                params = {**source.params, **window, source.cursor_param: marker}
        raise StepError(ErrorCategory.VALIDATION, f"the window holds more than max_pages={source.max_pages} pages; "
                        "raise source.max_pages or narrow the window", code="too_many_pages")  # fmt: skip

    async def write(self, dest: HttpDestination, prepared: list[Prepared], run: Progress, call: StepCall) -> None:
        base, trusted, defaults = await self._base(dest, call)
        timeout = min(dest.timeout_s or call.timeout_s, call.timeout_s)
        for start in range(0, len(prepared), dest.concurrency):
            chunk = prepared[start : start + dest.concurrency]
            results = await asyncio.gather(*(self._post(dest, base, trusted, timeout, p, call, defaults)
                                             for p in chunk), return_exceptions=True)  # fmt: skip
            # Count what this chunk wrote before raising what failed the step, so the output says how far it got.
            for record, result in zip(chunk, results, strict=True):
                if isinstance(result, _Refused):
                    run.tally.fail(record.key, result.field_path, str(result), result.raw_error)
                elif not isinstance(result, BaseException):
                    run.written(record, result)
            failed = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, _Refused)), None)
            if failed is not None:
                raise failed

    async def _post(self, dest: HttpDestination, base: str, trusted: str | None, timeout_s: float, record: Prepared,
                    call: StepCall, defaults: dict[str, str]) -> str | _Refused | None:  # fmt: skip
        """Write one record: its destination id (None when not given), or why the destination refused it."""
        url = base.replace("{key}", quote(record.key, safe=""))
        headers = {**defaults, **dest.headers, "Content-Type": "application/json",
                   "Idempotency-Key": f"{call.run_id}:{call.step}:{_header_safe(record.key)}"}  # fmt: skip
        response = await self._request(dest.method, url, trusted, timeout_s=timeout_s, headers=headers,
                                       content=orjson.dumps(record.data))  # fmt: skip
        status = response.status_code
        if 200 <= status < 300:
            found = _json(response)
            value = jmespath.search(dest.id_path, found) if dest.id_path and found is not None else None
            return key_text(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
        shown = f"{dest.method} {mask_text(url)}"
        if 300 <= status < 400:
            raise StepError(ErrorCategory.VALIDATION, f"{shown} answered {status} (a redirect); give the final URL",
                            status_code=status, code="http_status")  # fmt: skip
        body = _json(response)
        category = http_category(status)
        if category is not None:
            retry_after = response.headers.get("retry-after")
            raise StepError(category, f"{shown} answered {error_message(body, status, response.reason_phrase)}",
                            status_code=status, code="http_status", field_path=None,
                            details={"retry_after": retry_after} if retry_after else {})  # fmt: skip
        return _Refused(error_field_path(body), error_message(body, status, response.reason_phrase),
                       raw_http_error(status, response.content, response.headers.get("content-type", "")))  # fmt: skip


class _Refused(Exception):
    """The destination refused one record (a 4xx other than auth and throttling): listed, never raised."""

    def __init__(self, field_path: str | None, message: str, raw_error: Any) -> None:
        super().__init__(message)
        self.field_path = field_path
        self.raw_error = raw_error


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _header_safe(key: str) -> str:
    return key if key.isascii() and key.isprintable() else quote(key, safe="")


def _json(response: httpx.Response) -> Any:
    if "json" not in response.headers.get("content-type", "") or not response.content:
        return None
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _source_body(response: httpx.Response, url: str) -> Any:
    status = response.status_code
    shown = f"GET {mask_text(url)}"
    if status >= 300:
        body = _json(response)
        category = http_category(status) or ErrorCategory.VALIDATION
        raise StepError(category, f"{shown} answered {error_message(body, status, response.reason_phrase)}",
                        status_code=status, code="http_status",
                        details={"raw_error": raw_http_error(status, response.content, "")})  # fmt: skip
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise StepError(ErrorCategory.VALIDATION, f"{shown} answered {status} without a JSON body",
                        code="not_json") from exc  # fmt: skip


def _search_or_fail(expression: str, body: Any, field_path: str) -> Any:
    try:
        return jmespath.search(expression, body)
    except JMESPathError as exc:
        raise StepError(ErrorCategory.VALIDATION, f"{field_path} `{expression}`: {exc}", field_path=field_path) from exc
