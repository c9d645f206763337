"""`sync_records` over PostgreSQL: reading a source query's window in a read-only transaction and upserting records
one statement each, so a refused row (a constraint, bad data) fails that record and leaves the others written."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import asyncpg

from schemas.events import ErrorCategory
from services.common.failures import masked_message
from services.executor.adapters.actions_base import StepCall, StepError, json_safe
from services.executor.adapters.actions_db import SCHEMES, DatabaseActions, classify_sqlstate, coerce_param
from services.executor.adapters.connectors import ConnectorRegistry
from services.executor.sync import (
    DatabaseEnd,
    PostgresDestination,
    PostgresSource,
    SyncRecordsInput,
    key_text,
    parse_stamp,
)
from services.executor.sync_errors import pg_field, raw_pg_error, too_many
from services.executor.sync_mapping import Prepared, Progress, upsert_sql


def window_param(type_name: str, value: str | None, *, low: bool) -> Any:
    """A window bound for a `$1`/`$2` of the query's type; an open bound is ±infinity for times, else null."""
    stamp = parse_stamp(value) if value is not None else None
    if type_name == "timestamptz":
        return stamp or (dt.datetime.min if low else dt.datetime.max).replace(tzinfo=dt.UTC)
    if type_name == "timestamp":
        return stamp.astimezone(dt.UTC).replace(tzinfo=None) if stamp else (dt.datetime.min if low else dt.datetime.max)
    return coerce_param(type_name, value)


class PostgresEnds:
    """Reads a PostgreSQL source and writes a PostgreSQL destination through database_query's guarded pools."""

    def __init__(self, connectors: ConnectorRegistry, db: DatabaseActions) -> None:
        self.connectors = connectors
        self.db = db

    async def _dsn(self, db: DatabaseEnd, call: StepCall) -> tuple[str, dict[str, Any]]:
        """The DSN and the connect arguments that pin a flow's own DSN (or a tenant connector's) to its checked
        addresses; an operator-configured connector is trusted."""
        if db.connector is not None:
            connector = await self.connectors.resolve(call.tenant_id, call.environment, db.connector, SCHEMES,
                                                      "database")  # fmt: skip
            return connector.url, {} if connector.trusted else await self.db._guard(connector.url)
        assert db.dsn is not None
        return db.dsn, await self.db._guard(db.dsn)

    async def read(self, source: PostgresSource, spec: SyncRecordsInput, call: StepCall) -> list[Any]:
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
            raise too_many(spec.max_records)
        return [json_safe(dict(row.items()), str) for row in rows]

    async def write(self, dest: PostgresDestination, prepared: list[Prepared], run: Progress, call: StepCall) -> None:
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
                        run.tally.fail(record.key, pg_field(exc, columns), masked_message(exc), raw_pg_error(exc))
                        continue
                    value = row[0] if row is not None and dest.id_column else None
                    run.written(record, key_text(json_safe(value, str)) if value is not None else None)


# Refusals of one row: constraint violations (class 23), bad data (class 22), a value asyncpg cannot bind.
_REFUSED_ROW = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, asyncpg.exceptions._base.DataError)


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
