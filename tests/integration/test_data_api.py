"""The canonical read API (docs/api-contract.md) over records that sync steps wrote, deduplicated by external ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import events as ev
from schemas.events import EventBase, TriggerInfo
from tests.conftest import Infra
from tests.harness import KeySpec, append_ledger, assert_verify_equal, auth, keep_history_of, running, wait_projected

T0 = datetime(2026, 6, 12, 18, 0, tzinfo=UTC)


def sync_run(run_id: str, start: datetime, batches: list[tuple[str, list[dict[str, Any]]]],
             environment: str = "PRODUCTION") -> list[EventBase]:  # fmt: skip
    out: list[EventBase] = []

    def emit(cls: Any, **payload: Any) -> None:
        seq = len(out)
        out.append(cls(tenant_id="acme", run_id=run_id, flow_id="shopify-orders", flow_version=1, seq=seq,
                       occurred_at=start + timedelta(seconds=seq), causation_id=f"{run_id}:{seq}",
                       correlation_id=run_id, payload=payload))  # fmt: skip

    emit(ev.RunRequested, trigger=TriggerInfo(type="schedule"), environment=environment)
    emit(ev.RunQueued)
    emit(ev.RunStarted)
    emit(ev.StepStarted, step="sync", position=0, action="sync_records", input={})
    for entity, records in batches:
        emit(ev.RecordsUpserted, step="sync", entity=entity, records=records)
    emit(ev.StepSucceeded, step="sync", output={})
    emit(ev.RunSucceeded, duration_ms=1000.0)
    return out


def order(n: int, status: str, minute: int, **extra_ids: str) -> dict[str, Any]:
    return {
        "external_ids": {"shopify": f"gid://shopify/Order/{n}", **extra_ids},
        "data": {"order_number": str(n), "status": status, "total_cents": 1000 + n, "currency": "USD"},
        "source_updated_at": (T0 + timedelta(minutes=minute)).isoformat(),
    }


async def test_data_api_lists_pages_and_fetches_deduplicated_records(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    keys = {"data": KeySpec("acme", scopes=("data:read",)), "runs_only": KeySpec("acme", scopes=("runs:read",))}
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api")) as env:
        await keep_history_of(env, "acme")
        first = sync_run("run_sync_1", T0, [("order", [order(n, "pending", 0) for n in range(1, 121)])])
        # The next sync sees order 7 paid and learns its NetSuite id; order 8 again with an older source stamp.
        second = sync_run("run_sync_2", T0 + timedelta(hours=1), [
            ("order", [order(7, "paid", 30, netsuite="SO-7"), {**order(8, "stale", -30)}]),
            ("customer", [{"external_ids": {"shopify": "c1"}, "data": {"email": "a@example.com"}}]),
        ])  # fmt: skip
        testing = sync_run("run_sync_t", T0, [("order", [order(999, "paid", 0)])], environment="TESTING")
        events = first + second + testing
        await append_ledger(env.sandbox, events + first[:6])
        await wait_projected(env, len(events) + 6)
        async with env.client() as api:
            seen: list[dict[str, Any]] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 50, **({"cursor": cursor} if cursor else {})}
                page = (await api.get("/api/public/data/order", params=params)).json()
                assert page["entity"] == "order" and page["count"] == len(page["data"]) <= 50
                seen += page["data"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert len(seen) == 120  # 120 orders, each once; the TESTING one is not visible to a live key
            assert len({r["canonical_id"] for r in seen}) == 120
            updated = [r["updated_at"] for r in seen]
            assert updated == sorted(updated)
            seven = next(r for r in seen if r["order_number"] == "7")
            assert seven["status"] == "paid"
            assert seven["external_ids"] == {"shopify": "gid://shopify/Order/7", "netsuite": "SO-7"}
            eight = next(r for r in seen if r["order_number"] == "8")
            assert eight["status"] == "pending"  # the older source update did not win

            recent = (await api.get("/api/public/data/order", params={
                "updated_since": (T0 + timedelta(minutes=30)).isoformat(), "fields": "status,total_cents",
            })).json()["data"]  # fmt: skip
            assert {r["canonical_id"] for r in recent} == {seven["canonical_id"], eight["canonical_id"]}
            assert all(set(r) == {"canonical_id", "status", "total_cents"} for r in recent)

            one = (await api.get(f"/api/public/data/order/{seven['canonical_id']}")).json()
            assert one["status"] == "paid" and one["canonical_id"] == seven["canonical_id"]
            customers = (await api.get("/api/public/data/customer")).json()
            assert [c["email"] for c in customers["data"]] == ["a@example.com"]

            unknown = await api.get("/api/public/data/widget")
            assert unknown.status_code == 404 and "invoice" in unknown.json()["error"]["message"]
            assert (await api.get("/api/public/data/order/nope")).status_code == 404
            assert (await api.get("/api/public/data/order", params={"cursor": "garbage"})).status_code == 400
            forbidden = await api.get("/api/public/data/order", headers=auth(env.keys["runs_only"]))
            assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"

        await assert_verify_equal(env.sandbox)
