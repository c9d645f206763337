"""slo_burn alerts on the real broker and database, with the projector and the API as processes: a flow's runs
page when both windows of the fast pair (1 h and 5 min) or of the slow pair (6 h and 30 min) burn the error
budget too fast, never on one window alone, and resolve once no pair burns; the alert goes out like every
kind's (a loopback webhook receiver stands in). Runs failing INTERNAL (Flowtrail's own bug) page the deployment's
on-call webhook without any rule, once per error fingerprint per hour. Email channels are refused while no SMTP
server is set.

Runs are dated from the rule's creation on (a rule judges runs that finish after it exists), up to hours
ahead: the windows are counted in event time, so an hour of history is appended in a second."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.events import EventBase
from tests.conftest import Infra
from tests.harness import (
    LOOPBACK_WEBHOOKS,
    Env,
    answer,
    append_ledger,
    connected,
    running,
    stub_upstream,
    wait_sql,
    wait_until,
)
from tests.integration.test_alerts import alerts_of, finished, new_rule, play

OBJECTIVE = 0.99  # 1 % of runs may fail: the fast pair pages above 14.4 %, the slow one above 6 %
B = 300.0  # minutes of history before the fast test's hour


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with stub_upstream({("POST", "/webhook"): answer("ok"), ("POST", "/oncall"): answer("ok")}) as inbox:
        settings = {**LOOPBACK_WEBHOOKS, "FLOWTRAIL_PROJECTOR_ALERT_BACKOFF_S": "0.2",
                    "FLOWTRAIL_PROJECTOR_ALERT_POLL_S": "0.05",
                    "FLOWTRAIL_PROJECTOR_ONCALL_WEBHOOK_URL": f"{inbox.url}/oncall"}  # fmt: skip
        async with running(infra, tmp_path_factory, keys={"admin": "t1", "t2": "t2"}, services=("projector", "api"),
                           env=settings, upstream=inbox) as env:  # fmt: skip
            yield env


def runs(
    prefix: str, flow: str, t0: datetime, at_minutes: list[float], statuses: str
) -> list[tuple[str, str, datetime, str]]:
    """(run id, status, finished at, flow) for play(): 'S'/'F' runs at t0 + the given minutes."""
    names = {"S": "SUCCEEDED", "F": "FAILED"}
    assert len(at_minutes) == len(statuses)
    return [(f"{prefix}{i}", names[s], t0 + timedelta(minutes=m), flow)
            for i, (m, s) in enumerate(zip(at_minutes, statuses, strict=True))]  # fmt: skip


async def slo_rule(env: Env, api: Any, flow: str) -> tuple[dict[str, Any], datetime]:
    rule = await new_rule(api, flow_id=flow, kind="slo_burn", objective=OBJECTIVE, name=f"{flow} SLO",
                          channels=[{"type": "webhook", "url": f"{env.upstream.url}/webhook"}])  # fmt: skip
    return rule, datetime.fromisoformat(rule["created_at"]) + timedelta(seconds=1)


async def test_fast_pair_pages_not_one_window_alone_and_resolves_when_no_pair_burns(env: Env) -> None:
    async with env.client() as api:
        rule, t0 = await slo_rule(env, api, "f-fast")
        assert rule["kind"] == "slo_burn" and rule["objective"] == OBJECTIVE
        assert (rule["fast_long_minutes"], rule["fast_short_minutes"], rule["fast_factor"]) == (60, 5, 14.4)
        assert (rule["slow_long_minutes"], rule["slow_short_minutes"], rule["slow_factor"]) == (360, 30, 6)

        # Five hours of one success a minute keep the 6 h window cool throughout. Then an hour of successes,
        # then two failures and three successes within five minutes: the 5 min window burns (2 of 5), the hour
        # does not (2 of 107): no page.
        await play(env, runs("base", "f-fast", t0, [float(m) for m in range(1, 301)], "S" * 300))
        calm = [B + 0.5 * i for i in range(1, 101)]
        await play(env, runs("ok", "f-fast", t0, calm, "S" * 100))
        await play(env, runs("blip", "f-fast", t0, [B + 58, B + 58.5, B + 59, B + 59.5, B + 60], "FFSSS"))
        assert await alerts_of(api, rule) == []

        # More failures: once 17 of the hour's 117 runs failed (> 14.4 %) both fast windows burn: one page.
        await play(env, runs("down", "f-fast", t0, [B + 60.2 + 0.1 * i for i in range(16)], "F" * 16))
        (alert,) = await alerts_of(api, rule)
        assert alert["status"] == "open" and alert["kind"] == "slo_burn" and alert["run_id"] == "down14"
        assert alert["payload"]["pair"] == {"long_minutes": 60, "short_minutes": 5, "factor": 14.4}
        assert alert["payload"]["windows"]["60"]["burn_rate"] > 14.4 and "1h/5m > 14.4x" in alert["reason"]

        # A success while the failures are still in the last 5 min resolves nothing.
        await play(env, runs("back", "f-fast", t0, [B + 62], "S"))
        assert [a["status"] for a in await alerts_of(api, rule)] == ["open"]
        # Five quiet minutes later no pair burns (the 6 h window never did): resolved by that run.
        await play(env, runs("calm", "f-fast", t0, [B + 67], "S"))
        (alert,) = await alerts_of(api, rule)
        assert alert["status"] == "resolved" and alert["resolved_by_run_id"] == "calm0"

        async def both_sent() -> bool:
            ds = (await api.get(f"/v1/alerts/{alert['id']}")).json()["deliveries"]
            return [(d["action"], d["status"]) for d in ds] == [("trigger", "delivered"), ("resolve", "delivered")]

        await wait_until(both_sent, logs=env.log_tails)
        sent = [
            c.json()["event"] for c in env.upstream.seen("/webhook") if c.json()["data"]["alert"]["id"] == alert["id"]
        ]
        assert sent == ["alert.fired", "alert.resolved"]


async def test_slow_pair_pages_a_steady_ten_percent_failure_rate(env: Env) -> None:
    """10 % of runs failing: under the fast pair's 14.4 % over the hour, over the slow pair's 6 %."""
    async with env.client() as api:
        rule, t0 = await slo_rule(env, api, "f-slow")
        await play(env, runs("slow", "f-slow", t0, [float(i + 1) for i in range(20)], ("S" * 9 + "F") * 2))
        first, second = await alerts_of(api, rule)
        assert first["run_id"] == "slow9" and first["kind"] == "slo_burn"
        assert first["payload"]["pair"] == {"long_minutes": 360, "short_minutes": 30, "factor": 6}
        assert "6h/30m > 6x" in first["reason"]
        # Seven successes thin the failure to 1 in 17 (under 6 %): resolved; the next failure (2 in 20) pages again.
        assert first["status"] == "resolved" and first["resolved_by_run_id"] == "slow16"
        assert second["run_id"] == "slow19" and second["status"] == "open"


async def test_a_tenant_wide_objective_counts_every_flow_of_the_tenant(env: Env) -> None:
    """flow_id '*': one failure among eleven runs of two flows (9 %) burns the tenant's budget on the slow pair,
    while the flow that never failed stays quiet under its own rule. Tenant t2: no other test's runs count."""
    async with env.client(key="t2") as api:
        tenant, t0 = await slo_rule(env, api, "*")
        quiet, _ = await slo_rule(env, api, "f-ta")
        await play(env, runs("ta", "f-ta", t0, [float(m) for m in range(1, 11)], "S" * 10), tenant="t2")
        await play(env, runs("tb", "f-tb", t0, [10.5], "F"), tenant="t2")
        (alert,) = await alerts_of(api, tenant)
        assert alert["run_id"] == "tb0" and alert["flow_id"] == "*" and alert["payload"]["flow_id"] == "f-tb"
        assert alert["payload"]["windows"]["360"] == {"failed": 1, "runs": 11, "burn_rate": 9.0909}
        assert alert["reason"].startswith("the tenant's flows are burning") and "6h/30m > 6x" in alert["reason"]
        assert await alerts_of(api, quiet) == []


async def test_rules_and_channels_that_cannot_work_are_refused(env: Env) -> None:
    async with env.client() as api:
        bad = [
            ({"flow_id": "f", "kind": "slo_burn"}, "needs objective"),
            ({"flow_id": "f", "kind": "slo_burn", "objective": 1}, "objective"),
            ({"flow_id": "f", "kind": "slo_burn", "objective": 0.99, "fast_short_minutes": 90},
             "fast_short_minutes must be shorter than fast_long_minutes"),
            ({"flow_id": "f", "kind": "failed_run", "objective": 0.99}, "objective do(es) not apply"),
            ({"flow_id": "*", "kind": "failed_run"}, "is for kind 'slo_burn' only"),
            # No FLOWTRAIL_PROJECTOR_SMTP_HOST in this deployment: an email channel could never deliver.
            ({"flow_id": "f", "kind": "failed_run", "channels": [{"type": "email", "to": ["ops@example.com"]}]},
             "FLOWTRAIL_PROJECTOR_SMTP_HOST is not set"),
        ]  # fmt: skip
        for body, needle in bad:
            r = await api.post("/v1/alert-rules", json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", (body, r.text)
            assert needle in r.json()["error"]["message"], (needle, r.text)
        rule = await new_rule(api, flow_id="f", kind="failed_run")
        r = await api.patch(f"/v1/alert-rules/{rule['id']}", json={"channels": [{"type": "email", "to": ["a@b.co"]}]})
        assert r.status_code == 422 and "FLOWTRAIL_PROJECTOR_SMTP_HOST" in r.json()["error"]["message"], r.text


def internal_failure(run_id: str, at: datetime, message: str, *, flow: str = "f-bug", category: str = "INTERNAL"
                     ) -> list[EventBase]:  # fmt: skip
    """A one-step run failing at `at` with an error of `category` (INTERNAL: Flowtrail's own bug)."""
    events = finished(run_id, "FAILED", at, flow=flow)
    error = {"category": category, "message": message}
    return [type(e).model_validate({**e.model_dump(), "payload": {**e.payload.model_dump(), "error": error}})
            if "error" in type(e.payload).model_fields else e for e in events]  # fmt: skip


async def test_internal_errors_page_on_call_once_per_fingerprint_per_hour(env: Env) -> None:
    t0 = datetime.now(UTC)
    crash, stuck = "KeyError: 'cursor' in the run loop", "AssertionError: snapshot went backwards"
    runs_ = [
        *internal_failure("bug-a0", t0 + timedelta(minutes=1), crash),
        *internal_failure("bug-a1", t0 + timedelta(minutes=2), crash),  # same fingerprint within the hour: quiet
        *internal_failure("bug-b0", t0 + timedelta(minutes=3), stuck),  # another fingerprint: pages
        *internal_failure("user-0", t0 + timedelta(minutes=4), "the CRM rejected the record", category="VALIDATION"),
        *internal_failure("bug-a2", t0 + timedelta(minutes=50), crash),  # still within the hour of a0: quiet
        *internal_failure("bug-a3", t0 + timedelta(minutes=62), crash),  # an hour after a0's page: pages again
    ]
    await append_ledger(env.sandbox, runs_, partitions=1)
    ids = sorted({e.run_id for e in runs_})
    async with connected(env) as db:
        await wait_sql(db, "SELECT count(*) = $2 FROM runs WHERE id = ANY($1::text[]) AND finished_at IS NOT NULL",
                       ids, len(ids), what="runs projected", logs=env.log_tails)  # fmt: skip

    async def three_pages() -> bool:
        return len(env.upstream.seen("/oncall")) >= 3

    await wait_until(three_pages, logs=env.log_tails)
    await asyncio.sleep(1)  # a fourth page would have been sent by now (the dispatcher looks every 50 ms)
    pages = [(dict(c.headers), c.json()) for c in env.upstream.seen("/oncall")]
    assert sorted(body["data"]["run_id"] for _, body in pages) == ["bug-a0", "bug-a3", "bug-b0"]
    by_run = {body["data"]["run_id"]: (headers, body) for headers, body in pages}
    headers, body = by_run["bug-a0"]
    assert headers["X-Flowtrail-Event"] == "flowtrail.internal_error" and headers["X-Flowtrail-Delivery"] == body["id"]
    data = body["data"]
    assert (data["tenant_id"], data["flow_id"], data["message"], data["window_s"]) == ("t1", "f-bug", crash, 3600)
    assert (
        data["fingerprint"] == by_run["bug-a3"][1]["data"]["fingerprint"] != by_run["bug-b0"][1]["data"]["fingerprint"]
    )
    assert "bug-a0" in body["summary"] and crash in body["summary"]
