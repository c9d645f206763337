"""Key-wise comparison of a live and a rebuilt table, for `flowtrail projector verify`'s report.

A checksum says that a table differs; this says where: both tables are read in key order (every key column as
text, "C" collation, so PostgreSQL's order is Python's) with an md5 per row, merged like a sorted join, and
for the first `limit` differing keys the two rows are read again as JSON to name the columns that differ.
Memory stays flat whatever the table's size: only the listed keys are kept, the rest are counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from services.common.db import _quote_ident

LIVE, REBUILT = "live", "rebuilt"


@dataclass(frozen=True)
class RowDifference:
    """One key whose rows differ: present on one side only, or with these columns unequal."""

    key: dict[str, str]  # key column → value (as text)
    only_in: str | None = None  # LIVE or REBUILT when the other side has no such row
    columns: tuple[str, ...] = ()  # the columns whose values differ
    live: dict[str, Any] = field(default_factory=dict)  # those columns' values, live
    rebuilt: dict[str, Any] = field(default_factory=dict)  # and rebuilt from the ledger

    @property
    def run_id(self) -> str | None:
        return self.key.get("run_id")


@dataclass
class TableDifference:
    rows: int = 0  # keys that differ in all
    first: list[RowDifference] = field(default_factory=list)  # the first of them in key order


def key_columns(order: str) -> list[str]:
    return [c.strip() for c in order.split(",")]


def _keyed_rows(table: str, schema: str, keys: list[str], where: str) -> str:
    cols = ", ".join(f"t.{c}::text" for c in keys)
    order = ", ".join(f't.{c}::text COLLATE "C"' for c in keys)
    return f"SELECT {cols}, md5(t::text) FROM {_quote_ident(schema)}.{table} t {where} ORDER BY {order}"


async def _rows(conn: asyncpg.Connection, query: str) -> AsyncIterator[tuple[tuple[str, ...], str]]:
    async for r in conn.cursor(query, prefetch=5000):
        values = tuple(r)
        yield values[:-1], values[-1]


async def diff_table(
    live: asyncpg.Connection,
    live_schema: str,
    rebuilt: asyncpg.Connection,
    rebuilt_schema: str,
    table: str,
    order: str,
    *,
    where: str = "",
    limit: int = 20,
) -> TableDifference:
    """Both connections must be inside a transaction (server-side cursors); `live` may be a snapshot taken long
    before the rebuilt rows were written, which is why the two sides are read on their own connections."""
    keys = key_columns(order)
    # The runs table's key is `id`; report it as run_id like the other run tables.
    names = ["run_id" if (table == "runs" and k == "id") else k for k in keys]
    out = TableDifference()
    pending: list[tuple[tuple[str, ...], str | None]] = []

    def found(key: tuple[str, ...], only_in: str | None) -> None:
        out.rows += 1
        if len(pending) < limit:
            pending.append((key, only_in))

    a = _rows(live, _keyed_rows(table, live_schema, keys, where))
    b = _rows(rebuilt, _keyed_rows(table, rebuilt_schema, keys, where))
    x, y = await anext(a, None), await anext(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            assert x is not None
            found(x[0], LIVE)
            x = await anext(a, None)
        elif x is None or y[0] < x[0]:
            found(y[0], REBUILT)
            y = await anext(b, None)
        else:
            if x[1] != y[1]:
                found(x[0], None)
            x, y = await anext(a, None), await anext(b, None)
    if not pending:
        return out
    both = [k for k, only_in in pending if only_in is None]
    live_rows = await _as_json(live, live_schema, table, keys, both)
    rebuilt_rows = await _as_json(rebuilt, rebuilt_schema, table, keys, both)
    for key, only_in in pending:
        named = dict(zip(names, key, strict=True))
        if only_in is not None:
            out.first.append(RowDifference(named, only_in=only_in))
            continue
        old, new = live_rows.get(key, {}), rebuilt_rows.get(key, {})
        columns = tuple(c for c in {**old, **new} if old.get(c) != new.get(c))
        out.first.append(RowDifference(named, columns=columns, live={c: old.get(c) for c in columns},
                                       rebuilt={c: new.get(c) for c in columns}))  # fmt: skip
    return out


async def _as_json(
    conn: asyncpg.Connection, schema: str, table: str, keys: list[str], wanted: list[tuple[str, ...]]
) -> dict[tuple[str, ...], dict[str, Any]]:
    if not wanted:
        return {}
    match = " AND ".join(f"t.{c}::text = w.k{i}" for i, c in enumerate(keys))
    params = ", ".join(f"${i + 1}::text[]" for i in range(len(keys)))
    names = ", ".join(f"k{i}" for i in range(len(keys)))
    cols = ", ".join(f"t.{c}::text" for c in keys)
    rows = await conn.fetch(
        f"SELECT {cols}, to_jsonb(t)::text AS j FROM {_quote_ident(schema)}.{table} t "
        f"JOIN unnest({params}) AS w({names}) ON {match}",
        *[[k[i] for k in wanted] for i in range(len(keys))],
    )
    return {tuple(r)[:-1]: orjson.loads(r["j"]) for r in rows}


def differing_runs(differences: Mapping[str, TableDifference], limit: int = 100) -> list[str]:
    """The runs named by the listed differences, in id order."""
    runs = {d.run_id for diff in differences.values() for d in diff.first if d.run_id is not None}
    return sorted(runs)[:limit]


def _value(value: Any, width: int = 60) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_rows(table: str, diff: TableDifference) -> list[str]:
    """Lines for a person: which keys differ and how."""
    shown = len(diff.first)
    lines = [f"{table}: {diff.rows:,} row(s) differ" + (f" (first {shown} in key order)" if shown < diff.rows else "")]
    for d in diff.first:
        key = " ".join(f"{k}={v}" for k, v in d.key.items())
        if d.only_in == LIVE:
            lines.append(f"  {key}: only in the live tables (the ledger does not derive it)")
        elif d.only_in == REBUILT:
            lines.append(f"  {key}: missing from the live tables (the ledger derives it)")
        else:
            changes = "; ".join(f"{c} live={_value(d.live[c])} rebuilt={_value(d.rebuilt[c])}" for c in d.columns)
            lines.append(f"  {key}: {changes or 'same values, different row text'}")
    return lines
