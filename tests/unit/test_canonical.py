"""Canonical records: deduplicated by external ids, newest source update wins, merges when ids link two."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import CanonicalRecord
from services.projector.canonical import Upsert, merge, new_canonical_id

T = datetime(2026, 6, 12, 18, 0, tzinfo=UTC)
SCOPE = ("t1", "PRODUCTION", "order")


def up(ids: dict[str, str], data: dict[str, object], minutes: int, source_minutes: int | None = None) -> Upsert:
    stamp = T + timedelta(minutes=source_minutes) if source_minutes is not None else None
    record = CanonicalRecord(external_ids=ids, data=data, source_updated_at=stamp)
    return Upsert(SCOPE, record, T + timedelta(minutes=minutes), f"run{minutes}")


def test_the_same_external_id_updates_one_record_and_newer_fields_win() -> None:
    out = merge([
        up({"shopify": "1042"}, {"status": "pending", "total_cents": 100}, 0, source_minutes=0),
        up({"shopify": "1042", "netsuite": "SO55"}, {"status": "paid"}, 1, source_minutes=5),
    ], {}, {})  # fmt: skip
    (row,) = out.rows.values()
    assert row.data == {"status": "paid", "total_cents": 100}
    assert row.external_ids == {"shopify": "1042", "netsuite": "SO55"}
    assert row.last_source_update_at == T + timedelta(minutes=5)
    assert (row.created_at, row.updated_at, row.last_run_id) == (T, T + timedelta(minutes=1), "run1")
    assert set(out.mappings.values()) == {row.canonical_id}
    assert len(out.mappings) == 2


def test_an_older_source_update_only_fills_missing_fields() -> None:
    out = merge([
        up({"shopify": "1"}, {"status": "paid"}, 0, source_minutes=10),
        up({"shopify": "1"}, {"status": "pending", "currency": "USD"}, 1, source_minutes=2),
    ], {}, {})  # fmt: skip
    (row,) = out.rows.values()
    assert row.data == {"status": "paid", "currency": "USD"}
    assert row.last_source_update_at == T + timedelta(minutes=10)


def test_a_record_linking_two_canonical_records_merges_them() -> None:
    first = merge([up({"shopify": "1"}, {"a": 1}, 0), up({"netsuite": "X"}, {"b": 2}, 1)], {}, {})
    assert len(first.rows) == 2
    # Next batch: the stored rows and mappings come back from the database.
    existing = dict(first.rows)
    second = merge([up({"shopify": "1", "netsuite": "X"}, {"c": 3}, 2)], first.mappings, existing)
    survivors = list(second.rows.values())
    assert len(survivors) == 1 and len(second.deleted) == 1
    (row,) = survivors
    assert row.data == {"a": 1, "b": 2, "c": 3}
    assert row.external_ids == {"shopify": "1", "netsuite": "X"}
    assert row.canonical_id == min(r.canonical_id for r in first.rows.values())
    assert set(second.mappings.values()) == {row.canonical_id}


def test_canonical_ids_are_deterministic_so_a_rebuild_gives_the_same_ids() -> None:
    record = CanonicalRecord(external_ids={"shopify": "1042", "netsuite": "SO55"})
    assert new_canonical_id(SCOPE, record) == new_canonical_id(SCOPE, record)
    other_tenant = ("t2", "PRODUCTION", "order")
    assert new_canonical_id(other_tenant, record) != new_canonical_id(SCOPE, record)
    once = merge([up({"shopify": "1042"}, {}, 0)], {}, {})
    again = merge([up({"shopify": "1042"}, {}, 0)], {}, {})
    assert list(once.rows) == list(again.rows)


def _apply_in_batches(batches: list[list[Upsert]]) -> dict[str, tuple[object, ...]]:
    """What the store does: each batch merges on top of the rows and mappings the previous ones left."""
    rows: dict = {}
    mappings: dict = {}
    for batch in batches:
        out = merge(batch, mappings, rows)
        for key in out.deleted:
            rows.pop(key, None)
        rows.update(out.rows)
        mappings.update(out.mappings)
    return {
        r.canonical_id: (r.external_ids, r.data, r.last_source_update_at, r.created_at, r.updated_at, r.last_run_id)
        for r in rows.values()
    }


def test_the_result_does_not_depend_on_the_order_updates_arrive_in() -> None:
    import itertools

    updates = [
        up({"shopify": "7"}, {"status": "pending", "total": 100}, 0, source_minutes=0),
        up({"shopify": "7", "netsuite": "SO-7"}, {"status": "paid"}, 60, source_minutes=30),
        up({"netsuite": "SO-7"}, {"currency": "USD", "status": "stale"}, 61, source_minutes=-30),
        up({"shopify": "8"}, {"status": "pending"}, 2),
    ]
    results = set()
    for order in itertools.permutations(updates):
        one_by_one = _apply_in_batches([[u] for u in order])
        all_at_once = _apply_in_batches([list(order)])
        assert one_by_one == all_at_once
        results.add(repr(sorted(one_by_one.items())))
    assert len(results) == 1
    (final,) = results
    assert "'status': 'paid'" in final and "'currency': 'USD'" in final and "'total': 100" in final
