"""sync_records' pure part: keys, dedupe, filter, mapping failures, destination errors, upsert SQL, input checks."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from schemas.events import ErrorCategory
from services.executor.adapters.actions_base import TRUNCATED, StepError, parse_input
from services.executor.adapters.sync_postgres import window_param
from services.executor.sync import SyncRecordsInput, key_text, parse_stamp
from services.executor.sync_errors import error_field_path, raw_http_error
from services.executor.sync_mapping import Tally, prepare, upsert_sql

BASE: dict[str, Any] = {
    "source": {"kind": "http", "url": "https://shop.example/orders.json", "records_path": "orders"},
    "destination": {"kind": "http", "url": "https://erp.example/salesOrder"},
    "key": "id",
    "mapping": {"ref": "name", "email": "customer.email", "total": "to_number(total)"},
    "updated_at": "updated_at",
}


def spec(**extra: Any) -> SyncRecordsInput:
    return parse_input(SyncRecordsInput, {**BASE, **extra}, "sync_records")


def rec(n: int, *, at: str = "2026-06-12T10:00:00Z", email: str | None = "a@example.com", **more: Any) -> dict:
    return {"id": n, "name": f"#{n}", "customer": {"email": email}, "total": "10.5", "updated_at": at, **more}


def run(records: list[Any], **extra: Any) -> tuple[list[Any], Tally]:
    tally = Tally()
    return prepare(records, spec(**extra), tally), tally


def test_records_are_mapped_with_jmespath_and_counted() -> None:
    prepared, tally = run([rec(1), rec(2)])
    assert [p.data for p in prepared] == [{"ref": "#1", "email": "a@example.com", "total": 10.5},
                                          {"ref": "#2", "email": "a@example.com", "total": 10.5}]  # fmt: skip
    assert [(p.key, p.updated_at) for p in prepared] == [("1", "2026-06-12T10:00:00+00:00"),
                                                         ("2", "2026-06-12T10:00:00+00:00")]  # fmt: skip
    assert tally.counters == {"read": 2, "transformed": 2, "written": 0, "deduped": 0, "skipped": 0, "failed": 0}


def test_a_duplicate_key_is_counted_and_the_newest_version_kept_in_first_seen_order() -> None:
    prepared, tally = run([rec(1), rec(2), rec(1, at="2026-06-12T11:00:00Z", name="#1-edited"), rec(2, name="#2b")])
    assert [p.data["ref"] for p in prepared] == ["#1-edited", "#2"]  # equal times: the first stays
    assert tally.counters["deduped"] == 2 and tally.counters["read"] == 4 and tally.counters["transformed"] == 2


def test_a_filter_that_is_falsy_skips_the_record() -> None:
    prepared, tally = run([rec(1, status="paid"), rec(2, status="cancelled"), rec(3)], filter="status == 'paid'")
    assert [p.key for p in prepared] == ["1"]
    assert tally.counters["skipped"] == 2 and tally.failures == []


def test_a_mapping_that_fails_or_a_missing_required_field_fails_only_that_record() -> None:
    records = [rec(1, qty=-2), rec(2, qty="two"), rec(3, qty=1, email=None)]
    prepared, tally = run(records, mapping={**BASE["mapping"], "qty": "abs(qty)"}, required=["email"])
    assert [(p.key, p.data["qty"]) for p in prepared] == [("1", 2)]
    assert [(f["record_key"], f["field_path"]) for f in tally.failures] == [("2", "qty"), ("3", "email")]
    assert "abs" in tally.failures[0]["error"] and tally.failures[1]["error"].startswith("email is required")
    assert tally.counters["failed"] == 2 and tally.counters["transformed"] == 1


def test_a_record_without_a_key_fails_by_its_position() -> None:
    _, tally = run([rec(1), {"name": "no id"}])
    assert tally.failures == [{"record_key": "#1", "field_path": "key", "error": "key `id` gave null",
                               "raw_error": None}]  # fmt: skip


def test_only_keys_takes_on_just_those_records() -> None:
    prepared, tally = run([rec(1), rec(2), {"name": "no id"}, rec(3)], only_keys=[3, "1"])
    assert [p.key for p in prepared] == ["1", "3"]
    assert tally.counters["read"] == 2 and tally.counters["failed"] == 0


KEYS = [("gid://shopify/Order/1", "gid://shopify/Order/1"), (12, "12"), (12.0, "12"), (1.5, "1.5"), (True, "true"),
        ([1, "a"], '[1,"a"]')]  # fmt: skip


@pytest.mark.parametrize(("value", "text"), KEYS)
def test_keys_are_text(value: Any, text: str) -> None:
    assert key_text(value) == text


def test_times_are_iso_or_epoch_and_naive_means_utc() -> None:
    assert parse_stamp("2026-06-12T18:21:04.512Z") == dt.datetime(2026, 6, 12, 18, 21, 4, 512000, tzinfo=dt.UTC)
    assert parse_stamp("2026-06-12 10:00:00") == dt.datetime(2026, 6, 12, 10, tzinfo=dt.UTC)
    assert parse_stamp(0) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert parse_stamp("yesterday") is None and parse_stamp(None) is None and parse_stamp(True) is None


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"error": {"field": "email", "message": "required"}}, "email"),
        ({"error": {"code": "x", "path": "lines[0].sku"}}, "lines[0].sku"),
        ({"errors": [{"field": "customer.email", "message": "blank"}]}, "customer.email"),
        ({"detail": [{"loc": ["body", "email"], "msg": "field required"}]}, "email"),  # FastAPI / pydantic
        ({"error": {"details": [{"field": "total"}]}}, "total"),
        ({"error": {"code": "bad"}}, None),
        ({"error": "bad"}, None),
        ("not an object", None),
    ],
)
def test_the_field_a_destination_error_names(body: Any, path: str | None) -> None:
    assert error_field_path(body) == path


def test_a_raw_destination_error_keeps_json_and_is_cut_at_two_kilobytes() -> None:
    assert raw_http_error(400, b'{"error":{"field":"email"}}', "application/json") == {
        "status": 400, "body": {"error": {"field": "email"}}}  # fmt: skip
    big = raw_http_error(502, b"x" * 5000, "text/html")
    assert big["status"] == 502 and len(big["body"]) == 2048 + len(TRUNCATED) and big["body"].endswith(TRUNCATED)
    assert raw_http_error(400, b"url=postgresql://u:pw@db/x", "text/plain")["body"] == "url=postgresql://u:***@db/x"


def test_the_upsert_updates_every_column_but_the_keys() -> None:
    assert upsert_sql("erp.sales_orders", ["external_id", "email", "amount"], ["external_id"], "ns_id") == (
        'INSERT INTO "erp"."sales_orders" ("external_id", "email", "amount") VALUES ($1, $2, $3) '
        'ON CONFLICT ("external_id") DO UPDATE SET "email" = EXCLUDED."email", "amount" = EXCLUDED."amount" '
        'RETURNING "ns_id"'
    )
    assert upsert_sql("links", ["a", "b"], ["a", "b"], None).endswith('ON CONFLICT ("a", "b") DO NOTHING')


def test_an_open_window_binds_infinity_for_times() -> None:
    since = window_param("timestamptz", None, low=True)
    assert since == dt.datetime.min.replace(tzinfo=dt.UTC)
    assert window_param("timestamptz", "2026-06-12T00:00:00Z", low=True) == dt.datetime(2026, 6, 12, tzinfo=dt.UTC)
    assert window_param("timestamp", "2026-06-12T02:00:00+02:00", low=False) == dt.datetime(2026, 6, 12)
    assert window_param("text", "2026-06-12T00:00:00Z", low=True) == "2026-06-12T00:00:00Z"


@pytest.mark.parametrize(
    ("change", "field_path", "says"),
    [
        ({"mapping": {"email": "customer.["}}, "mapping.email", "bad JMESPath"),
        ({"entity": "orders", "system": "shopify"}, "entity", "unknown entity"),
        ({"entity": "order"}, "", "needs `system`"),
        ({"required": ["phone"]}, "", "phone"),
        ({"destination": {"kind": "postgresql", "dsn": "postgresql://h/db", "table": "t", "key_columns": ["id"]}},
         "", "id"),
        ({"destination": {"kind": "http", "url": "https://x", "connector": "erp"}}, "destination.http", "exactly one"),
        ({"destination": {"kind": "http", "url": "https://x", "batch": True}}, "destination.http.batch", "False"),
        ({"source": {"kind": "ftp", "url": "ftp://x"}}, "source", "kind"),
        ({"window": {"updated_since": "last week"}}, "window.updated_since", "ISO 8601"),
    ],
)  # fmt: skip
def test_a_bad_input_fails_the_step_as_validation_naming_the_field(change: dict, field_path: str, says: str) -> None:
    with pytest.raises(StepError) as caught:
        spec(**change)
    assert caught.value.error.category == ErrorCategory.VALIDATION
    assert (caught.value.error.field_path or "") == field_path
    assert says in caught.value.error.message
