"""`sync_records`: read a window of records from a source, map each, write each to a destination; failures listed."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import asyncpg
import httpx
import jmespath
import orjson
from jmespath.exceptions import JMESPathError

from schemas.events import ErrorCategory
from schemas.flows import mask_secrets, mask_text
from services.common.failures import masked_message
from services.common.netguard import BlockedAddress, UnresolvableHost, check_url, guarded_client
from services.executor.adapters.actions_base import (
    StepCall,
    StepError,
    cap_output,
    json_safe,
    parse_input,
)
from services.executor.adapters.actions_db import SCHEMES, DatabaseActions, classify_sqlstate, coerce_param
from services.executor.adapters.connectors import ConnectorRegistry, as_registry
from services.executor.sync import (
    HTTP_SCHEMES,
    MAX_REDIRECTS,
    RAW_ERROR_BYTES,
    SAMPLE_SIZE,
    DatabaseEnd,
    Endpoint,
    HttpDestination,
    HttpSource,
    PostgresDestination,
    PostgresSource,
    Prepared,
    SyncRecordsInput,
    Tally,
    error_field_path,
    error_message,
    http_category,
    key_text,
    parse_stamp,
    prepare,
    raw_http_error,
    upsert_sql,
)


def window_param(type_name: str, value: str | None, *, low: bool) -> Any:
    """A window bound for a `$1`/`$2` of the query's type; an open bound is ±infinity for times, else null."""
    stamp = parse_stamp(value) if value is not None else None
    if type_name == "timestamptz":
        return stamp or (dt.datetime.min if low else dt.datetime.max).replace(tzinfo=dt.UTC)
    if type_name == "timestamp":
        return stamp.astimezone(dt.UTC).replace(tzinfo=None) if stamp else (dt.datetime.min if low else dt.datetime.max)
    return coerce_param(type_name, value)


# ---------------------------------------------------------------- the runner


class SyncRecordsActions:
    """Reads the whole window, then writes record by record; the step fails only for what fails every record.

    A destination 5xx (or 408/429) on one record's write fails the whole step as TRANSIENT instead of listing
    the record: it says the destination is down or throttling, not that the record is wrong, so the records
    after it would fail the same way, and a PARTIAL run would ask a human to retry what a backoff retry fixes
    (seed 000). The records written before it are repeated on the retry: an upsert is idempotent, and an HTTP
    write carries `Idempotency-Key: <run>:<step>:<record key>` — the same for every attempt of the step, so a
    destination that honours the header takes each record of a run once however often the step is retried.
    """

    def __init__(self, *, connectors: ConnectorRegistry | Mapping[str, str], allow_private: bool, max_output_bytes: int,
                 http: httpx.AsyncClient | None, db: DatabaseActions | None = None) -> None:  # fmt: skip
        self.connectors = as_registry(connectors)
        self.allow_private = allow_private
        self.max_bytes = max_output_bytes
        self._own_http = http is None
        # URLs written in flows go through the guarded client (resolved once, checked, pinned); a connector's
        # own origin through a plain one: the operator configured it, private or not.
        self.http = http or guarded_client(allow_private, follow_redirects=False)
        self.trusted_http = httpx.AsyncClient(follow_redirects=False)
        self._own_db = db is None
        self.db = db or DatabaseActions(connectors=connectors, allow_private=allow_private, max_rows=1,
                                        max_output_bytes=max_output_bytes)  # fmt: skip

    async def close(self) -> None:
        if self._own_http:
            await self.http.aclose()
        await self.trusted_http.aclose()
        if self._own_db:
            await self.db.close()

    async def sync(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(SyncRecordsInput, call.input, "sync_records")
        run = _Run(spec)
        try:
            with run.timed("read"):
                if isinstance(spec.source, HttpSource):
                    records = await self._read_http(spec.source, spec, call)
                else:
                    records = await self._read_postgres(spec.source, spec, call)
            with run.timed("transform"):
                prepared = prepare(records, spec, run.tally)
            run.sample = [p.data for p in prepared[:SAMPLE_SIZE]]
            with run.timed("write"):
                if isinstance(spec.destination, HttpDestination):
                    await self._write_http(spec.destination, prepared, run, call)
                else:
                    await self._write_postgres(spec.destination, prepared, run, call)
        except StepError as exc:
            exc.output = run.output(self.max_bytes)  # what was done before the step failed
            raise
        return run.output(self.max_bytes)

    # ---------------------------------------------------------------- HTTP

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

    async def _read_http(self, source: HttpSource, spec: SyncRecordsInput, call: StepCall) -> list[Any]:
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
                raise _too_many(spec.max_records)
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

    async def _write_http(self, dest: HttpDestination, prepared: list[Prepared], run: _Run, call: StepCall) -> None:
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

    # ---------------------------------------------------------------- PostgreSQL

    async def _dsn(self, db: DatabaseEnd, call: StepCall) -> tuple[str, dict[str, Any]]:
        """The DSN and the connect arguments that pin a flow's own DSN (or a tenant connector's) to its checked
        addresses; an operator-configured connector is trusted."""
        if db.connector is not None:
            connector = await self.connectors.resolve(call.tenant_id, call.environment, db.connector, SCHEMES,
                                                      "database")  # fmt: skip
            return connector.url, {} if connector.trusted else await self.db._guard(connector.url)
        assert db.dsn is not None
        return db.dsn, await self.db._guard(db.dsn)

    async def _read_postgres(self, source: PostgresSource, spec: SyncRecordsInput, call: StepCall) -> list[Any]:
        dsn, pinned = await self._dsn(source, call)
        timeout_ms = max(1, int(call.timeout_s * 900))  # the server cancels first, so the error says why
        with _postgres_errors():
            pool = await self.db._pool(dsn, pinned)
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                await conn.execute("SELECT set_config('statement_timeout', $1, true)", f"{timeout_ms}ms")
                stmt = await conn.prepare(source.query)
                types = [t.name for t in stmt.get_parameters()]
                if len(types) > 2:
                    message = f"the query takes {len(types)} parameters; only $1 (since) and $2 (until) are bound"
                    raise StepError(ErrorCategory.VALIDATION, message, code="parameter_count")
                read = spec.read_window()
                bounds = (read.updated_since, read.updated_until)
                params = [window_param(t, bounds[i], low=i == 0) for i, t in enumerate(types)]
                cursor = await stmt.cursor(*params)
                rows = await cursor.fetch(spec.max_records + 1)
        if len(rows) > spec.max_records:
            raise _too_many(spec.max_records)
        return [json_safe(dict(row.items()), str) for row in rows]

    async def _write_postgres(
        self, dest: PostgresDestination, prepared: list[Prepared], run: _Run, call: StepCall
    ) -> None:
        if not prepared:
            return
        dsn, pinned = await self._dsn(dest, call)
        columns = list(prepared[0].data)
        sql = upsert_sql(dest.table, columns, dest.key_columns, dest.id_column)
        with _postgres_errors():
            pool = await self.db._pool(dsn, pinned)
            async with pool.acquire() as conn:
                stmt = await conn.prepare(sql)
                types = [t.name for t in stmt.get_parameters()]
                for record in prepared:
                    params = [coerce_param(t, record.data[c]) for t, c in zip(types, columns, strict=True)]
                    try:
                        row = await stmt.fetchrow(*params)  # its own transaction: a refused row leaves the others
                    except _REFUSED_ROW as exc:
                        run.tally.fail(record.key, _pg_field(exc, columns), masked_message(exc), _raw_pg_error(exc))
                        continue
                    value = row[0] if row is not None and dest.id_column else None
                    run.written(record, key_text(json_safe(value, str)) if value is not None else None)


@dataclass
class _Run:
    """One call's progress; `output` is the step's output contract, also attached to a StepError."""

    spec: SyncRecordsInput
    tally: Tally = field(default_factory=Tally)
    upserts: list[dict[str, Any]] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "transform", "write"), 0.0))

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.timing[phase] += (time.perf_counter() - began) * 1000

    def written(self, record: Prepared, dest_id: str | None) -> None:
        self.tally.counters["written"] += 1
        if self.spec.entity is None:
            return
        assert self.spec.system is not None
        external_ids = {self.spec.system: record.key}
        if self.spec.dest_system is not None and dest_id is not None:
            external_ids[self.spec.dest_system] = dest_id
        self.upserts.append({"external_ids": external_ids, "data": record.data,
                             "source_updated_at": record.updated_at})  # fmt: skip

    def output(self, max_bytes: int) -> dict[str, Any]:
        return {
            "counters": dict(self.tally.counters),
            "failures": list(self.tally.failures),
            "upserts": list(self.upserts),
            "entity": self.spec.entity,
            "window": self.spec.window.model_dump(),
            "timing_ms": {phase: round(ms, 3) for phase, ms in self.timing.items()},
            "sample": cap_output(mask_secrets(self.sample), max_bytes),
        }


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


def _too_many(limit: int) -> StepError:
    return StepError(ErrorCategory.VALIDATION, f"the window holds more than max_records={limit} records; narrow the "
                     "window or raise max_records", code="too_many_records")  # fmt: skip


# Refusals of one row: constraint violations (class 23), bad data (class 22), a value asyncpg cannot bind.
_REFUSED_ROW = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, asyncpg.exceptions._base.DataError)
_ARGUMENT = re.compile(r"query argument \$(\d+)")


def _pg_field(exc: Exception, columns: Sequence[str]) -> str | None:
    """The column a refusal names: the server's column_name, else the `$n` asyncpg could not bind."""
    column = getattr(exc, "column_name", None)
    if column:
        return str(column)
    match = _ARGUMENT.search(str(exc))
    return columns[int(match.group(1)) - 1] if match and 0 < int(match.group(1)) <= len(columns) else None


def _raw_pg_error(exc: Exception) -> dict[str, Any]:
    """The server's refusal as the user needs to see it: SQLSTATE, message, detail, constraint, column."""
    raw: dict[str, Any] = {name: getattr(exc, attr, None) for name, attr in _PG_FIELDS}
    raw["message"] = str(exc)
    raw = {k: v[:RAW_ERROR_BYTES] if isinstance(v, str) else v for k, v in raw.items()}
    return mask_secrets({k: v for k, v in raw.items() if v is not None})


_PG_FIELDS = (("sqlstate", "sqlstate"), ("detail", "detail"), ("constraint", "constraint_name"),
              ("column", "column_name"), ("table", "table_name"))  # fmt: skip


@contextmanager
def _postgres_errors() -> Iterator[None]:
    """Errors of the whole database as StepErrors: SQLSTATE categories, refused connections TRANSIENT, masked."""
    try:
        yield
    except StepError:
        raise
    except asyncpg.PostgresError as exc:
        _raise(classify_sqlstate(exc.sqlstate), exc, exc.sqlstate)
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        _raise(ErrorCategory.VALIDATION, exc, "invalid_dsn")
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        _raise(ErrorCategory.TRANSIENT, exc, "network")


def _raise(category: ErrorCategory, exc: BaseException, code: str | None) -> NoReturn:
    raise StepError(category, masked_message(exc), code=code) from exc
