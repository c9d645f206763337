"""`sync_records`, the pure part: the step's input (validated after rendering), record mapping and the reading of a
destination's refusals. The I/O — reading the source, writing the destination — is `adapters/actions_sync.py`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import jmespath
import orjson
from jmespath.exceptions import JMESPathError
from pydantic import AfterValidator, Field, field_validator, model_validator

from schemas.events import CANONICAL_ENTITIES, ErrorCategory
from schemas.flows import Frozen, mask_secrets, mask_text
from services.executor.adapters.actions_base import TRUNCATED

HTTP_SCHEMES = ("http", "https")
RAW_ERROR_BYTES = 2048
SAMPLE_SIZE = 3
MAX_REDIRECTS = 5
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$"

# ---------------------------------------------------------------- input (validated after rendering)


def _jmespath(expression: str) -> str:
    try:
        jmespath.compile(expression)
    except JMESPathError as exc:
        raise ValueError(f"bad JMESPath {expression!r}: {exc}") from exc
    return expression


JMESPath = Annotated[str, Field(min_length=1), AfterValidator(_jmespath)]


class Endpoint(Frozen):
    """A URL written in the flow (guarded) or a configured connector (trusted) plus a `path` under it."""

    url: str | None = None
    connector: str | None = None
    path: str = ""  # appended to a connector's URL: {"connector": "netsuite", "path": "/orders"}
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_target(self) -> Endpoint:
        if (self.url is None) == (self.connector is None):
            raise ValueError("give exactly one of `url` or `connector` (a configured name)")
        return self


class HttpSource(Endpoint):
    kind: Literal["http"]
    records_path: JMESPath = "@"
    updated_since_param: str | None = "updated_at_min"  # null: the source takes no such parameter
    updated_until_param: str | None = "updated_at_max"
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # The next page: a URL (followed as is) or a cursor (sent as `cursor_param` with the window); null ends.
    next_page_path: JMESPath | None = None
    cursor_param: str = "cursor"
    max_pages: int = Field(default=100, ge=1, le=100_000)


class HttpDestination(Endpoint):
    kind: Literal["http"]
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    batch: Literal[False] = False  # one request per record, so each is accepted or refused on its own
    id_path: JMESPath | None = "id"  # the destination's id for the record, in its JSON answer
    concurrency: int = Field(default=4, ge=1, le=32)  # records in flight at once


class DatabaseEnd(Frozen):
    connector: str | None = None
    dsn: str | None = None  # postgresql://user:password@host/db; guarded like database_query's, masked when shown

    @model_validator(mode="after")
    def _one_connection(self) -> DatabaseEnd:
        if (self.connector is None) == (self.dsn is None):
            raise ValueError("give exactly one of `connector` (a configured name) or `dsn`")
        return self


class PostgresSource(DatabaseEnd):
    kind: Literal["postgresql"]
    query: str = Field(min_length=1)  # `$1` is bound to window.updated_since, `$2` to window.updated_until


class PostgresDestination(DatabaseEnd):
    kind: Literal["postgresql"]
    table: str = Field(pattern=IDENTIFIER[:-1] + r"(\.[A-Za-z_][A-Za-z0-9_$]{0,62})?$")  # name or schema.name
    key_columns: list[Annotated[str, Field(pattern=IDENTIFIER)]] = Field(min_length=1)
    id_column: Annotated[str, Field(pattern=IDENTIFIER)] | None = None  # RETURNING it as the destination id


class SyncWindow(Frozen):
    updated_since: str | None = None
    updated_until: str | None = None

    @field_validator("updated_since", "updated_until")
    @classmethod
    def _iso(cls, value: str | None) -> str | None:
        if value is not None and parse_stamp(value) is None:
            raise ValueError(f"{value!r} is not an ISO 8601 time")
        return value


class SyncRecordsInput(Frozen):
    """`sync_records`: records of `source` updated in `window`, mapped by `mapping`, written to `destination`."""

    source: Annotated[HttpSource | PostgresSource, Field(discriminator="kind")]
    destination: Annotated[HttpDestination | PostgresDestination, Field(discriminator="kind")]
    key: JMESPath  # the record's key in the source, as text
    mapping: dict[str, JMESPath] = Field(min_length=1)  # destination field → JMESPath over the source record
    required: list[str] = Field(default_factory=list)  # destination fields a record may not leave null
    updated_at: JMESPath | None = None
    filter: JMESPath | None = None  # falsy: the record is skipped
    entity: str | None = None  # a canonical entity: written records are upserted for the data API
    system: str | None = Field(default=None, min_length=1)  # the source system's name, e.g. shopify
    dest_system: str | None = Field(default=None, min_length=1)  # e.g. netsuite
    window: SyncWindow = SyncWindow()
    only_keys: list[str] | None = None  # a retry of a PARTIAL run: just these records
    max_records: int = Field(default=100_000, ge=1)

    @field_validator("only_keys", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        return [k if isinstance(k, str) else key_text(k) for k in value] if isinstance(value, list) else value

    @field_validator("entity")
    @classmethod
    def _canonical(cls, value: str | None) -> str | None:
        if value is not None and value not in CANONICAL_ENTITIES:
            raise ValueError(f"unknown entity {value!r}; one of {', '.join(CANONICAL_ENTITIES)}")
        return value

    def read_window(self) -> SyncWindow:
        """The bounds the source is asked for: the run's window, except that a retry of a PARTIAL run (`only_keys`)
        reads past its `updated_until`. Fixing a refused record at the source (the usual remedy, seed 000) moves
        the record's update time past the window the original run read, and the retry is there to send the record
        as it is now; bounded, it would read nothing and succeed having sent nothing."""
        if self.only_keys is None:
            return self.window
        return SyncWindow(updated_since=self.window.updated_since)

    @model_validator(mode="after")
    def _consistent(self) -> SyncRecordsInput:
        if self.entity is not None and self.system is None:
            raise ValueError("`entity` needs `system`, the source system's name its records are known by")
        unmapped = [f for f in self.required if f not in self.mapping]
        if isinstance(self.destination, PostgresDestination):
            unmapped += [c for c in self.destination.key_columns if c not in self.mapping]
            unmapped += [c for c in self.mapping if not _is_identifier(c)]
        if unmapped:
            raise ValueError(f"fields not in `mapping` (or not column names): {', '.join(unmapped)}")
        return self


# ---------------------------------------------------------------- pure helpers


def key_text(value: Any) -> str:
    """A record key as text: strings as they are, numbers as written in JSON (12, not 12.0 when integral)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return orjson.dumps(value).decode()


def parse_stamp(value: Any) -> dt.datetime | None:
    """An ISO 8601 text or epoch seconds as an aware time (naive means UTC); anything else None."""
    try:
        if isinstance(value, str):
            stamp = dt.datetime.fromisoformat(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            stamp = dt.datetime.fromtimestamp(value, dt.UTC)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.UTC)


def error_field_path(body: Any) -> str | None:
    """The field a destination's JSON error names: `error.field`, `error.path`, `errors[0].field`, FastAPI's loc…"""
    for expression in _FIELD_PATHS:
        found = jmespath.search(expression, body) if isinstance(body, dict) else None
        if isinstance(found, list) and found and all(isinstance(p, str | int) for p in found):
            parts = [str(p) for p in found]
            return ".".join(parts[1:] if parts[0] in ("body", "query") and len(parts) > 1 else parts)
        if isinstance(found, str | int) and not isinstance(found, bool) and str(found):
            return str(found)
    return None


# NetSuite's REST API (the seed's "Shopify → NetSuite Orders" destination) answers RFC 9457 problem details with
# its own `o:errorDetails` list: `{"o:errorDetails": [{"detail": "Please enter value(s) for: Email",
# "o:errorPath": "email", "o:errorCode": "USER_ERROR"}]}`.
_NETSUITE = '"o:errorDetails"[0]'
_FIELD_PATHS = (
    *(f"{base}.{name}"
      for base in ("error", "errors[0]", "error.details[0]", "error.errors[0]", "detail[0]", "@")
      for name in ("field", "path", "field_path", "pointer", "loc")),
    f'{_NETSUITE}."o:errorPath"',
)  # fmt: skip
_MESSAGES = ("error.message", "errors[0].message", "detail[0].msg", f"{_NETSUITE}.detail", "message", "detail", "error")


def error_message(body: Any, status: int, reason: str) -> str:
    for expression in _MESSAGES:
        found = jmespath.search(expression, body) if isinstance(body, dict) else None
        if isinstance(found, str) and found:
            return mask_text(f"{status} {reason}: {found}")
    return f"{status} {reason}"


def raw_http_error(status: int, content: bytes, content_type: str) -> dict[str, Any]:
    """The destination's answer as the user needs to see it: status and body (JSON when it is), ~2 KB at most."""
    body: Any = None
    if "json" in content_type and len(content) <= RAW_ERROR_BYTES:
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError:
            body = None
    if body is None:
        text = content[:RAW_ERROR_BYTES].decode(errors="replace")
        body = text + (TRUNCATED if len(content) > RAW_ERROR_BYTES else "")
    return {"status": status, "body": mask_secrets(body)}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A source record ready to write: its key, the mapped record and the source's update time."""

    key: str
    data: dict[str, Any]
    updated_at: str | None


@dataclass
class Tally:
    """Counters and per-record failures, shared by the pure phase and the writes."""

    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("read", "transformed", "written", "deduped", "skipped", "failed"), 0)
    )
    failures: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, key: str, field_path: str | None, error: str, raw_error: Any = None) -> None:
        self.counters["failed"] += 1
        self.failures.append({"record_key": key, "field_path": field_path, "error": mask_text(error),
                              "raw_error": raw_error})  # fmt: skip


class _RecordError(Exception):
    """A JMESPath that failed on one record (a function given the wrong type…): that record fails, not the step."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(message)
        self.field_path = field_path


def _search(expression: str, record: Any, field_path: str) -> Any:
    """The expression's value over the record, or the _RecordError saying why it has none (returned, not raised)."""
    try:
        return jmespath.search(expression, record)
    except JMESPathError as exc:
        return _RecordError(field_path, f"{field_path}: `{expression}` failed: {exc}")


def prepare(records: Sequence[Any], spec: SyncRecordsInput, tally: Tally) -> list[Prepared]:
    """Key, select (only_keys), dedupe, filter and map the records read; no I/O.

    Of several records with one key the newest by `updated_at` is kept (the first when times tie or are absent):
    a record updated while the window was being paged can appear twice, and its later state is the one to write.
    Only the records this run takes on are counted `read`: with `only_keys`, the ones named.
    """
    wanted = set(spec.only_keys) if spec.only_keys is not None else None
    kept: dict[str, tuple[Any, dt.datetime | None]] = {}
    for index, record in enumerate(records):
        found = _search(spec.key, record, "key")
        if found is None or isinstance(found, _RecordError):
            if wanted is None:
                tally.counters["read"] += 1
                tally.fail(f"#{index}", "key", str(found) if found else f"key `{spec.key}` gave null")
            continue
        key = key_text(found)
        if wanted is not None and key not in wanted:
            continue
        tally.counters["read"] += 1
        stamp = parse_stamp(_search(spec.updated_at, record, "updated_at")) if spec.updated_at else None
        if key not in kept:
            kept[key] = (record, stamp)
            continue
        tally.counters["deduped"] += 1
        previous = kept[key][1]
        if stamp is not None and (previous is None or stamp > previous):
            kept[key] = (record, stamp)
    prepared: list[Prepared] = []
    for key, (record, stamp) in kept.items():
        if spec.filter is not None:
            passes = _search(spec.filter, record, "filter")
            if isinstance(passes, _RecordError):
                tally.fail(key, passes.field_path, str(passes))
                continue
            if not _truthy(passes):
                tally.counters["skipped"] += 1
                continue
        data = {name: _search(expression, record, name) for name, expression in spec.mapping.items()}
        problem = next((v for v in data.values() if isinstance(v, _RecordError)), None)
        missing = next((n for n in spec.required if data[n] is None or data[n] == ""), None)
        if problem is None and missing is not None:
            problem = _RecordError(missing, f"{missing} is required; `{spec.mapping[missing]}` gave nothing")
        if problem is not None:
            tally.fail(key, problem.field_path, str(problem))
            continue
        tally.counters["transformed"] += 1
        prepared.append(Prepared(key, data, stamp.isoformat() if stamp else None))
    return prepared


def _truthy(value: Any) -> bool:
    # JMESPath's truth: false, null, "", [] and {} are false; 0 is true.
    return value is not None and value is not False and value not in ("", [], {})


def _is_identifier(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c in "_$" for c in name)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def upsert_sql(table: str, columns: Sequence[str], key_columns: Sequence[str], id_column: str | None) -> str:
    """INSERT … ON CONFLICT (keys) DO UPDATE of the other columns: writing a record twice leaves one row."""
    target = ".".join(quote_ident(part) for part in table.split("."))
    names = ", ".join(quote_ident(c) for c in columns)
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    others = [c for c in columns if c not in key_columns]
    action = ("DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
              if others else "DO NOTHING")  # fmt: skip
    returning = f" RETURNING {quote_ident(id_column)}" if id_column else ""
    keys = ", ".join(quote_ident(c) for c in key_columns)
    return f"INSERT INTO {target} ({names}) VALUES ({values}) ON CONFLICT ({keys}) {action}{returning}"


def http_category(status: int) -> ErrorCategory | None:
    """A status that fails the whole step (seed 000), or None for a per-record refusal (other 4xx)."""
    if status in (401, 403, 407):
        return ErrorCategory.AUTH
    if status in (408, 425, 429) or status >= 500:
        return ErrorCategory.TRANSIENT
    return None
