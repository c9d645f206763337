"""`database_query`: one parameterised SQL statement on PostgreSQL; rows back as capped JSON, credentials masked."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from schemas.events import ErrorCategory
from schemas.flows import DatabaseQueryInput, mask_text
from services.common.failures import classify_sqlstate, masked_message
from services.common.netguard import BlockedAddress, UnresolvableHost, guard_dsn
from services.executor.adapters.actions_base import (
    StepCall,
    StepError,
    json_safe,
    json_size,
    parse_input,
)
from services.executor.adapters.connectors import ConnectorRegistry, as_registry

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 10.0


class DatabaseActions:
    """A small pool per connection string, kept for the next step that uses it."""

    def __init__(self, *, connectors: ConnectorRegistry | Mapping[str, str], allow_private: bool, max_rows: int,
                 max_output_bytes: int, max_pools: int = 16) -> None:  # fmt: skip
        self.connectors = as_registry(connectors)
        self.allow_private = allow_private
        self.max_rows = max_rows
        self.max_bytes = max_output_bytes
        self.max_pools = max_pools
        self._pools: OrderedDict[str, asyncpg.Pool] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def query(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(DatabaseQueryInput, call.input, "database_query")
        pinned: dict[str, Any] = {}
        if spec.connector is not None:
            connector = await self.connectors.resolve(call.tenant_id, call.environment, spec.connector, SCHEMES,
                                                      "database")  # fmt: skip
            dsn = connector.url
            # The operator's own connectors are trusted, private addresses included; a tenant's are guarded.
            pinned = {} if connector.trusted else await self._guard(dsn)
        else:
            assert spec.dsn is not None
            dsn = spec.dsn
            pinned = await self._guard(dsn)
        shown = {"connection": mask_text(dsn), "connector": spec.connector, "query": spec.query,
                 "params": json_safe(spec.params, str)}  # fmt: skip
        # The server cancels the statement before the step's own timeout, so the error says what happened.
        statement_timeout = min(spec.timeout_s or call.timeout_s, call.timeout_s * 0.9)
        max_rows = min(spec.max_rows or self.max_rows, self.max_rows)
        try:
            return {**shown, **await self._execute(dsn, pinned, spec, statement_timeout, max_rows)}
        except StepError as exc:
            exc.output = shown
            raise
        except asyncpg.PostgresError as exc:
            detail = {"detail": mask_text(exc.detail)} if getattr(exc, "detail", None) else {}
            raise StepError(classify_sqlstate(exc.sqlstate), masked_message(exc), code=exc.sqlstate, output=shown,
                            details=detail) from exc  # fmt: skip
        except (asyncpg.ClientConfigurationError, ValueError) as exc:
            raise StepError(ErrorCategory.VALIDATION, masked_message(exc), code="invalid_dsn", output=shown) from exc
        except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
            # Refused, unreachable, reset or a connect that did not finish: the database may be back later.
            raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="network", output=shown) from exc

    async def _execute(self, dsn: str, pinned: dict[str, Any], spec: DatabaseQueryInput, timeout_s: float,
                       max_rows: int) -> dict[str, Any]:  # fmt: skip
        pool = await self._pool(dsn, pinned)
        async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn, conn.transaction(readonly=spec.read_only):
            await conn.execute("SELECT set_config('statement_timeout', $1, true)", f"{max(1, int(timeout_s * 1000))}ms")
            stmt = await conn.prepare(spec.query)
            expected = stmt.get_parameters()
            if len(expected) != len(spec.params):
                raise StepError(ErrorCategory.VALIDATION, f"the query takes {len(expected)} parameter(s) "
                                f"($1…), {len(spec.params)} given in `params`", code="parameter_count")  # fmt: skip
            params = [coerce_param(t.name, v) for t, v in zip(expected, spec.params, strict=True)]
            columns = [a.name for a in stmt.get_attributes()]
            if columns:
                # A cursor reads one row past the cap, never the whole result, whatever its size.
                cursor = await stmt.cursor(*params)
                records = await cursor.fetch(max_rows + 1)
            else:
                records = await stmt.fetch(*params)
            status = stmt.get_statusmsg() or None
        rows: list[dict[str, Any]] = []
        truncated = len(records) > max_rows
        size = 0
        for record in records[:max_rows]:
            row = {key: json_safe(value, _cell) for key, value in record.items()}
            size += json_size(row)
            if size > self.max_bytes:
                truncated = True
                break
            rows.append(row)
        return {"columns": columns, "rows": rows, "row_count": len(rows), "truncated": truncated, "status": status}

    async def _pool(self, dsn: str, pinned: dict[str, Any] | None = None) -> asyncpg.Pool:
        """The DSN's pool; `pinned` (from `_guard`) makes its connections go to the checked addresses, also
        the ones it opens later: a pool made from a guarded DSN never resolves the DSN's names again."""
        pool = self._pools.get(dsn)
        if pool is not None:
            self._pools.move_to_end(dsn)
            return pool
        pool = await asyncpg.create_pool(dsn, min_size=0, max_size=4, init=_init_connection, timeout=CONNECT_TIMEOUT_S,
                                         max_inactive_connection_lifetime=60, **(pinned or {}))  # fmt: skip
        assert pool is not None
        if dsn in self._pools:  # another step made one meanwhile
            await pool.close()
            return self._pools[dsn]
        self._pools[dsn] = pool
        while len(self._pools) > self.max_pools:
            _, oldest = self._pools.popitem(last=False)
            task = asyncio.create_task(oldest.close())  # waits for the steps still using it
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return pool

    async def _guard(self, dsn: str) -> dict[str, Any]:
        """A DSN written in a flow may not reach private networks or local sockets unless the deployment allows
        it. Its hosts are read by asyncpg's own parser, each resolved once and checked; the answer is the
        connect arguments pinning the connection to the checked addresses (services.common.netguard)."""
        if urlsplit(dsn).scheme not in SCHEMES:
            raise StepError(ErrorCategory.VALIDATION, "dsn must be a postgresql:// URL", code="invalid_dsn")
        try:
            return await guard_dsn(dsn, allow_private=self.allow_private)
        except BlockedAddress as exc:
            raise StepError(ErrorCategory.VALIDATION, masked_message(exc), code="blocked_address") from exc
        except UnresolvableHost as exc:
            raise StepError(ErrorCategory.TRANSIENT, masked_message(exc), code="unresolvable_host") from exc
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, ValueError) as exc:
            raise StepError(ErrorCategory.VALIDATION, masked_message(exc), code="invalid_dsn") from exc


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb as Python values both ways: a dict parameter binds to jsonb, a jsonb column reads as an object.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
                                  schema="pg_catalog", format="text")  # fmt: skip


def _cell(value: Any) -> Any:
    """Column values json_safe does not know: composite rows as objects, ranges, networks, geometry as text."""
    if isinstance(value, asyncpg.Record):
        return json_safe(dict(value.items()), _cell)
    return str(value)


_INTS = {"int2", "int4", "int8", "oid"}
_TEXTS = {"text", "varchar", "bpchar", "name", "citext"}


def coerce_param(type_name: str, value: Any) -> Any:
    """A JSON parameter as the Python type asyncpg binds to the parameter's SQL type (ISO text → timestamp…).

    What cannot be converted is passed as is, and the server's error names the parameter.
    """
    if value is None or isinstance(value, bool):
        return value
    try:
        if type_name.startswith("_") and isinstance(value, Sequence) and not isinstance(value, str):
            return [coerce_param(type_name[1:], v) for v in value]
        if type_name in ("timestamptz", "timestamp") and isinstance(value, str):
            return dt.datetime.fromisoformat(value)
        if type_name == "date" and isinstance(value, str):
            return dt.date.fromisoformat(value)
        if type_name == "numeric" and isinstance(value, int | float | str):
            return Decimal(str(value))
        if type_name in _INTS and (isinstance(value, str) or (isinstance(value, float) and value.is_integer())):
            return int(value)
        if type_name in ("float4", "float8") and isinstance(value, int | str):
            return float(value)
        if type_name in _TEXTS and isinstance(value, int | float):
            return str(value)
    except (ValueError, InvalidOperation):
        pass
    return value
