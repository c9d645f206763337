"""`sync_records`, the pure input: the step's input model (validated after rendering) and how its keys and times
read. The mapping is `sync_mapping.py`, the reading of failures `sync_errors.py`, the I/O `adapters/actions_sync.py`
with `adapters/sync_http.py` and `adapters/sync_postgres.py`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import jmespath
import orjson
from jmespath.exceptions import JMESPathError
from pydantic import AfterValidator, Field, field_validator, model_validator

from schemas.events import CANONICAL_ENTITIES
from schemas.flows import DatabaseConnection, Frozen

HTTP_SCHEMES = ("http", "https")
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


class DatabaseEnd(DatabaseConnection):
    """A PostgreSQL source or destination; its DSN is guarded like database_query's and masked when shown."""


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
        reads past its `updated_until`. Fixing a refused record at the source (the usual remedy) moves
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


def _is_identifier(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c in "_$" for c in name)
