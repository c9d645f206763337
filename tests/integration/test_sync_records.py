"""sync_records on loopback HTTP servers (a Shopify-like source, a NetSuite-like destination) and real PostgreSQL."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from schemas.events import CanonicalRecord, ErrorCategory, RecordFailedPayload, RecordsProcessedPayload
from services.executor.adapters.actions_sync import SyncRecordsActions
from services.executor.adapters.steps import StepCall, StepError
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import free_port
from tests.harness import stub_upstream

PASSWORD = "hunter2-not-shown"
WINDOW = {"updated_since": "2026-06-12T00:00:00Z", "updated_until": "2026-06-13T00:00:00Z"}


def order(number: int, email: str | None = "ada@example.com", *, at: str = "2026-06-12T10:00:00Z",
          status: str = "paid", total: str = "124.50") -> dict[str, Any]:  # fmt: skip
    """An order as Shopify's Admin API lists it (the fields a NetSuite sales order needs)."""
    customer = {"first_name": "Ada", "last_name": "Lovelace"}
    return {"id": number, "name": f"#{number}", "email": email, "financial_status": status, "total_price": total,
            "currency": "USD", "updated_at": at, "customer": customer}  # fmt: skip


ORDERS = [order(1001), order(1002, at="2026-06-12T11:00:00Z"), order(1003, email=None),
          order(1004, at="2026-06-12T12:00:00Z"), order(1005, at="2026-06-12T13:00:00Z")]  # fmt: skip
OLD = order(999, at="2026-06-01T00:00:00Z")  # before the window: the source leaves it out when asked to


@dataclass
class Shop:
    """Lists orders updated in `(updated_at_min, updated_at_max]`, two a page, with a `page_info` cursor."""

    orders: list[dict[str, Any]]
    page_size: int = 2
    status: int = 200
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.requests.append(query)
        if self.status != 200:
            return web.json_response({"errors": "[API] Invalid API key or access token"}, status=self.status)
        since, until = query.get("updated_at_min"), query.get("updated_at_max")
        selected = [o for o in self.orders if (since is None or o["updated_at"] > since)
                    and (until is None or o["updated_at"] <= until)]  # fmt: skip
        start = int(query.get("page_info", "0"))
        following = start + self.page_size if start + self.page_size < len(selected) else None
        return web.json_response({"orders": selected[start : start + self.page_size],
                                  "next_page_info": str(following) if following is not None else None})  # fmt: skip


@dataclass
class Erp:
    """Creates sales orders; refuses one without a customer email (400 naming the field); `fail_after` then 503."""

    status: int | None = None  # answer every write with this status
    fail_after: int | None = None  # accept this many writes, then 503
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # Idempotency-Key → the sales order it created
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((dict(request.headers), body))
        if self.status is not None:
            return web.json_response({"error": {"code": "unauthorized", "message": "token revoked"}},
                                     status=self.status)  # fmt: skip
        if self.fail_after is not None and len(self.ids) >= self.fail_after:
            return web.Response(status=503, text="maintenance")
        if not body.get("email"):
            error = {"code": "USER_ERROR", "field": "email", "message": "Please enter a value for customer email"}
            return web.json_response({"error": error}, status=400)
        key = request.headers["Idempotency-Key"]
        created = self.ids.setdefault(key, f"SO-{len(self.ids) + 1}")
        return web.json_response({"id": created}, status=201)


@dataclass
class Apps:
    shop: Shop
    erp: Erp
    actions: SyncRecordsActions


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    shop, erp = Shop(orders=[*copy.deepcopy(ORDERS), OLD]), Erp()
    routes = {
        ("GET", "/admin/api/orders.json"): shop.handle,
        ("POST", "/services/rest/record/v1/salesOrder"): erp.handle,
    }
    async with stub_upstream(routes) as upstream:
        shop.url = f"{upstream.url}/admin/api/orders.json"
        erp.url = f"{upstream.url}/services/rest/record/v1/salesOrder"
        actions = SyncRecordsActions(connectors={}, allow_private=True, max_output_bytes=64 * 1024, http=None)
        try:
            yield Apps(shop, erp, actions)
        finally:
            await actions.close()


def spec(apps: Apps, **extra: Any) -> dict[str, Any]:
    """The "Shopify → NetSuite Orders" flow's sync step, as the executor renders it."""
    return {
        "source": {"kind": "http", "url": apps.shop.url, "records_path": "orders", "next_page_path": "next_page_info",
                   "cursor_param": "page_info", "headers": {"X-Shopify-Access-Token": "shpat_secret"}},
        "destination": {"kind": "http", "url": apps.erp.url, "method": "POST"},
        "key": "id",
        "mapping": {"externalId": "name", "email": "email", "total": "to_number(total_price)", "currency": "currency",
                    "customer": "{firstName: customer.first_name, lastName: customer.last_name}"},
        "updated_at": "updated_at",
        "entity": "order",
        "system": "shopify",
        "dest_system": "netsuite",
        "window": WINDOW,
        **extra,
    }  # fmt: skip


def step_call(input: dict[str, Any], *, run_id: str = "run-1", attempt: int = 1) -> StepCall:
    return StepCall(run_id=run_id, step="sync", action="sync_records", attempt=attempt, input=input,
                    started_at=datetime.now(UTC), timeout_s=20)  # fmt: skip


async def failing(actions: SyncRecordsActions, call: StepCall) -> StepError:
    with pytest.raises(StepError) as caught:
        await actions.sync(call)
    return caught.value


# ---------------------------------------------------------------- HTTP → HTTP


async def test_orders_sync_writes_the_good_records_and_lists_the_refused_one(apps: Apps) -> None:
    out = await apps.actions.sync(step_call(spec(apps)))

    assert out["counters"] == {"read": 5, "transformed": 5, "written": 4, "deduped": 0, "skipped": 0, "failed": 1}
    [failure] = out["failures"]
    assert failure["record_key"] == "1003" and failure["field_path"] == "email"
    assert "Please enter a value for customer email" in failure["error"]
    assert failure["raw_error"] == {"status": 400, "body": {"error": {
        "code": "USER_ERROR", "field": "email", "message": "Please enter a value for customer email"}}}  # fmt: skip
    # Every page was read, each with the run's window; the order updated before the window was never asked for.
    assert [r.get("page_info") for r in apps.shop.requests] == [None, "2", "4"]
    assert all(r["updated_at_min"] == WINDOW["updated_since"] and r["updated_at_max"] == WINDOW["updated_until"]
               for r in apps.shop.requests)  # fmt: skip
    written = [body for _, body in apps.erp.received if body["email"]]
    assert written[0] == {"externalId": "#1001", "email": "ada@example.com", "total": 124.5, "currency": "USD",
                          "customer": {"firstName": "Ada", "lastName": "Lovelace"}}  # fmt: skip
    # Canonical records for the data API: known by their Shopify id and the sales order NetSuite created.
    assert [u["external_ids"] for u in out["upserts"]] == [
        {"shopify": str(n), "netsuite": apps.erp.ids[f"run-1:sync:{n}"]} for n in (1001, 1002, 1004, 1005)
    ]
    assert out["upserts"][1]["source_updated_at"] == "2026-06-12T11:00:00+00:00"
    assert out["entity"] == "order" and out["window"] == WINDOW
    assert [s["externalId"] for s in out["sample"]] == ["#1001", "#1002", "#1003"]
    assert set(out["timing_ms"]) == {"read", "transform", "write"} and out["timing_ms"]["write"] > 0
    # The lead turns the output into ledger events: it fits them, and the source's token is nowhere in it.
    RecordsProcessedPayload(step="sync", **out["counters"])
    RecordFailedPayload(step="sync", **out["failures"][0])
    [CanonicalRecord(**u) for u in out["upserts"]]
    assert b"shpat_secret" not in orjson.dumps(out)


async def test_a_duplicate_keeps_the_newest_and_a_filter_skips(apps: Apps) -> None:
    newer = order(1002, at="2026-06-12T15:00:00Z", total="130.00")  # edited while the window was paged
    cancelled = order(1006, status="cancelled")
    apps.shop.orders = [*copy.deepcopy(ORDERS), newer, cancelled]

    out = await apps.actions.sync(step_call(spec(apps, filter="financial_status != 'cancelled'")))

    assert out["counters"] == {"read": 7, "transformed": 5, "written": 4, "deduped": 1, "skipped": 1, "failed": 1}
    sent = {body["externalId"]: body for _, body in apps.erp.received}
    assert sent["#1002"]["total"] == 130.0 and "#1006" not in sent
    assert len(apps.erp.received) == 5  # 1002 once, the cancelled order never


async def test_a_retry_of_a_partial_run_reprocesses_only_its_failed_records(apps: Apps) -> None:
    first = await apps.actions.sync(step_call(spec(apps)))
    failed = [f["record_key"] for f in first["failures"]]
    apps.shop.orders[2]["email"] = "grace@example.com"  # someone fixed the customer in Shopify
    apps.erp.received.clear()

    out = await apps.actions.sync(step_call(spec(apps, only_keys=failed), run_id="run-2"))

    assert out["counters"] == {"read": 1, "transformed": 1, "written": 1, "deduped": 0, "skipped": 0, "failed": 0}
    assert [body["externalId"] for _, body in apps.erp.received] == ["#1003"]
    assert out["upserts"][0]["external_ids"]["shopify"] == "1003"


async def test_the_idempotency_key_is_stable_so_a_re_executed_or_retried_attempt_does_not_double_write(
    apps: Apps,
) -> None:
    first = await apps.actions.sync(step_call(spec(apps)))
    second = await apps.actions.sync(step_call(spec(apps), attempt=2))  # a retry after a 503 sends the same keys

    keys = [headers["Idempotency-Key"] for headers, body in apps.erp.received if body["email"]]
    assert keys[:4] == keys[4:] == [f"run-1:sync:{n}" for n in (1001, 1002, 1004, 1005)]
    assert len(apps.erp.ids) == 4  # the ERP created each sales order once
    assert first["upserts"] == second["upserts"]


async def test_a_destination_503_fails_the_step_as_transient_after_what_it_wrote(apps: Apps) -> None:
    apps.erp.fail_after = 2
    destination = {"kind": "http", "url": apps.erp.url, "concurrency": 1}

    error = await failing(apps.actions, step_call(spec(apps, destination=destination)))

    assert error.error.category == ErrorCategory.TRANSIENT and error.error.status_code == 503
    assert error.output["counters"]["written"] == 2 and error.output["failures"] == []
    assert len(apps.erp.received) == 3  # it stopped at the first 503 instead of failing every record after it


@pytest.mark.parametrize("side", ["source", "destination"])
async def test_a_revoked_credential_fails_the_step_as_auth(apps: Apps, side: str) -> None:
    if side == "source":
        apps.shop.status = 401
    else:
        apps.erp.status = 401

    error = await failing(apps.actions, step_call(spec(apps)))

    assert error.error.category == ErrorCategory.AUTH and error.error.status_code == 401
    assert error.output["counters"]["written"] == 0


async def test_an_unreachable_source_fails_the_step_as_transient(apps: Apps) -> None:
    source = {"kind": "http", "url": f"http://127.0.0.1:{free_port()}/orders.json", "records_path": "orders"}

    error = await failing(apps.actions, step_call(spec(apps, source=source)))

    assert error.error.category == ErrorCategory.TRANSIENT and error.error.code == "network"


async def test_a_loopback_url_is_refused_unless_the_deployment_allows_private_networks(apps: Apps) -> None:
    guarded = SyncRecordsActions(connectors={}, allow_private=False, max_output_bytes=64 * 1024, http=None)
    try:
        error = await failing(guarded, step_call(spec(apps)))
    finally:
        await guarded.close()

    assert error.error.category == ErrorCategory.VALIDATION and error.error.code == "blocked_address"
    assert "127.0.0.1" in error.error.message and apps.shop.requests == []


async def test_configured_connectors_are_trusted_and_their_credentials_are_not_shown(apps: Apps) -> None:
    # The operator configured these (private addresses allowed); the flow only names them.
    erp = apps.erp.url.replace("http://", f"http://ns:{PASSWORD}@").removesuffix("/salesOrder")
    connectors = {"shop": apps.shop.url.removesuffix("/orders.json"), "netsuite": erp}
    actions = SyncRecordsActions(connectors=connectors, allow_private=False, max_output_bytes=64 * 1024, http=None)
    source = {"kind": "http", "connector": "shop", "path": "/orders.json", "records_path": "orders",
              "next_page_path": "next_page_info", "cursor_param": "page_info"}  # fmt: skip
    destination = {"kind": "http", "connector": "netsuite", "path": "/salesOrder"}
    try:
        out = await actions.sync(step_call(spec(apps, source=source, destination=destination)))
        apps.erp.status = 401
        refused = await failing(actions, step_call(spec(apps, source=source, destination=destination)))
    finally:
        await actions.close()

    assert out["counters"]["written"] == 4
    assert apps.erp.received[0][0]["Authorization"].startswith("Basic ")  # the connector's user:password
    assert refused.error.category == ErrorCategory.AUTH
    assert PASSWORD not in refused.error.message and PASSWORD not in orjson.dumps(out).decode()


# ---------------------------------------------------------------- PostgreSQL → PostgreSQL


def with_password(dsn: str) -> str:
    """The test database trusts local logins, so any password connects; it must never be shown."""
    scheme, rest = dsn.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{PASSWORD}@{host}"


@pytest.fixture
async def tables(db: asyncpg.Connection, sandbox: Sandbox) -> tuple[str, str]:
    source, dest = f"{sandbox.schema}.shop_orders", f"{sandbox.schema}.ns_sales_orders"
    await db.execute(f"""
        CREATE TABLE {source} (id bigint PRIMARY KEY, email text, total numeric, updated_at timestamptz NOT NULL);
        INSERT INTO {source} VALUES
          (1001, 'ada@example.com', 124.50, '2026-06-12T10:00:00Z'),
          (1002, 'bob@example.com', 80.00, '2026-06-12T11:00:00Z'),
          (1003, NULL, 15.00, '2026-06-12T12:00:00Z'),
          (999, 'old@example.com', 1.00, '2026-06-01T00:00:00Z');
        CREATE TABLE {dest} (ns_id serial, external_id text PRIMARY KEY, email text NOT NULL, amount numeric,
                             source_updated_at timestamptz);
    """)  # fmt: skip
    return source, dest


def pg_spec(infra: Infra, source: str, dest: str) -> dict[str, Any]:
    dsn = with_password(infra.database_url)
    return {
        "source": {"kind": "postgresql", "dsn": dsn,
                   "query": f"SELECT * FROM {source} WHERE updated_at > $1 AND updated_at <= $2 ORDER BY id"},
        "destination": {"kind": "postgresql", "dsn": dsn, "table": dest, "key_columns": ["external_id"],
                        "id_column": "ns_id"},
        "key": "id",
        "mapping": {"external_id": "join('', ['SO-', to_string(id)])", "email": "email", "amount": "total",
                    "source_updated_at": "updated_at"},
        "updated_at": "updated_at", "entity": "order", "system": "shop_db", "dest_system": "erp_db",
        "window": WINDOW,
    }  # fmt: skip


async def test_postgresql_to_postgresql_upserts_and_re_running_changes_nothing(
    infra: Infra, tables: tuple[str, str], db: asyncpg.Connection
) -> None:
    source, dest = tables
    actions = SyncRecordsActions(connectors={}, allow_private=True, max_output_bytes=64 * 1024, http=None)
    try:
        first = await actions.sync(step_call(pg_spec(infra, source, dest)))
        rows = [dict(r) for r in await db.fetch(f"SELECT * FROM {dest} ORDER BY external_id")]
        second = await actions.sync(step_call(pg_spec(infra, source, dest), run_id="run-2"))
        again = [dict(r) for r in await db.fetch(f"SELECT * FROM {dest} ORDER BY external_id")]
        await db.execute(f"UPDATE {source} SET total = 99.00 WHERE id = 1002")
        await actions.sync(step_call(pg_spec(infra, source, dest), run_id="run-3"))
        changed = await db.fetchval(f"SELECT amount FROM {dest} WHERE external_id = 'SO-1002'")
    finally:
        await actions.close()

    assert first["counters"] == {"read": 3, "transformed": 3, "written": 2, "deduped": 0, "skipped": 0, "failed": 1}
    [failure] = first["failures"]
    assert failure["record_key"] == "1003" and failure["field_path"] == "email"
    assert failure["raw_error"]["sqlstate"] == "23502"  # not null violation, from the destination itself
    assert [(r["external_id"], r["email"], float(r["amount"])) for r in rows] == [
        ("SO-1001", "ada@example.com", 124.5), ("SO-1002", "bob@example.com", 80.0)]  # fmt: skip
    assert again == rows and second["counters"] == first["counters"]  # the upsert is idempotent
    assert [u["external_ids"] for u in second["upserts"]] == [
        {"shop_db": str(n), "erp_db": str(row["ns_id"])} for n, row in zip((1001, 1002), rows, strict=True)
    ]
    assert float(changed) == 99.0
    assert PASSWORD not in orjson.dumps([first, second]).decode()


async def test_a_missing_destination_table_fails_the_step_with_the_password_masked(
    infra: Infra, tables: tuple[str, str]
) -> None:
    source, dest = tables
    broken = pg_spec(infra, source, dest)
    broken["destination"]["table"] = dest + "_nope"
    actions = SyncRecordsActions(connectors={}, allow_private=True, max_output_bytes=64 * 1024, http=None)
    try:
        error = await failing(actions, step_call(broken))
    finally:
        await actions.close()

    assert error.error.category == ErrorCategory.VALIDATION and error.error.code == "42P01"  # undefined table
    assert error.output["counters"]["transformed"] == 3 and error.output["counters"]["written"] == 0
    assert PASSWORD not in error.error.message
