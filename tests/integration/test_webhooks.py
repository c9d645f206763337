"""Signed webhooks end to end: run events become deliveries, a receiver verifying them as a subscriber would
(`services.common.webhooks.verify`) accepts every one and rejects tampered, wrong-secret and stale ones, failures are
retried with backoff and logged attempt by attempt, redelivery works, and tenants never see each other's
subscriptions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from schemas.events import FlowPaused
from services.common.kafka import publish_flow_events
from services.common.webhooks import sign, verify
from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import LOOPBACK_WEBHOOKS, Env, answer, append_ledger, first_calls, running, stub_upstream, wait_until

SECRET = "whsec_test_0123456789abcdef"
WEBHOOKS = {
    **LOOPBACK_WEBHOOKS, "FLOWTRAIL_PROJECTOR_WEBHOOK_BACKOFF_S": "0.2", "FLOWTRAIL_PROJECTOR_WEBHOOK_POLL_S": "0.05",
}  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    # The receiver (env.upstream, at /hooks) answers 500 to the first two deliveries of each id, then 200.
    receiver = first_calls(2, answer("try later", 500), answer(), per=lambda call: call.headers["X-Flowtrail-Delivery"])
    async with (
        stub_upstream({("POST", "/hooks"): receiver}) as upstream,
        running(infra, tmp_path_factory, keys={"admin": "t1", "other": "t2"}, services=("projector", "api"),
                env=WEBHOOKS, upstream=upstream) as env,
    ):  # fmt: skip
        yield env


def hooks_url(env: Env) -> str:
    return env.upstream.url + "/hooks"


def received(env: Env) -> list[tuple[dict[str, str], bytes]]:
    """Every request the receiver was sent, in order: (headers, body)."""
    return [(dict(c.headers), c.body) for c in env.upstream.seen("/hooks")]


def attempts(env: Env, delivery_id: str) -> int:
    return sum(headers["X-Flowtrail-Delivery"] == delivery_id for headers, _ in received(env))


async def test_signed_deliveries_with_retries_and_a_full_attempt_log(env: Env) -> None:
    async with env.client() as api:
        r = await api.post("/v1/webhooks", json={"url": hooks_url(env), "secret": SECRET,
                                                 "events": ["run.started", "run.failed", "flow.paused"]})  # fmt: skip
        assert r.status_code == 201, r.text
        sub = r.json()
        assert sub["secret"] == SECRET and sub["events"] == ["flow.paused", "run.failed", "run.started"]
        assert "secret" not in (await api.get("/v1/webhooks")).json()["data"][0]

        ok = run_events("run-ok", tenant_id="t1", steps=1, start=datetime.now(UTC))
        bad = run_events("run-bad", tenant_id="t1", steps=2, fail_at=1, start=datetime.now(UTC))
        foreign = run_events("run-t2", tenant_id="t2", steps=1, fail_at=0, start=datetime.now(UTC))
        events = ok + bad + foreign
        # Delivered twice by Kafka: still one delivery per event.
        await append_ledger(env.sandbox, events + events)
        pause = FlowPaused(tenant_id="t1", flow_id="f1", flow_version=1, reason="maintenance")
        await publish_flow_events(env.sandbox.infra.kafka_bootstrap, env.sandbox.topics, [pause])

        last: list[dict[str, Any]] = []

        async def all_delivered() -> list[dict[str, Any]] | None:
            last[:] = (await api.get(f"/v1/webhooks/{sub['id']}/deliveries")).json()["data"]
            return last if len(last) == 4 and all(d["status"] == "delivered" for d in last) else None

        deliveries = await wait_until(all_delivered, what="4 deliveries", logs=lambda: f"{last}\n{env.log_tails()}")
    # run-ok started; run-bad started and failed; the flow paused. run-t2 belongs to another tenant.
    assert sorted(d["event"] for d in deliveries) == ["flow.paused", "run.failed", "run.started", "run.started"]
    for d in deliveries:
        # Two 500s then a 200, each attempt logged with its answer.
        assert [a["status_code"] for a in d["attempt_log"]] == [500, 500, 200]
        assert d["attempts"] == 3 and d["delivered_at"] is not None
        gaps = [(b["at"], a["at"]) for a, b in zip(d["attempt_log"], d["attempt_log"][1:], strict=False)]
        assert all(datetime.fromisoformat(b) > datetime.fromisoformat(a) for b, a in gaps)

    # The receiver saw every attempt signed with the subscription's secret.
    assert len(received(env)) == 12
    for headers, body in received(env):
        assert verify(SECRET, body, headers["X-Flowtrail-Signature"])
        payload = orjson.loads(body)
        assert headers["X-Flowtrail-Event"] == payload["event"]
        assert headers["X-Flowtrail-Delivery"] == payload["id"]
    failed = next(orjson.loads(b) for _, b in received(env) if orjson.loads(b)["event"] == "run.failed")
    assert failed["data"]["run"]["id"] == "run-bad" and failed["data"]["run"]["failed_step"] == "step1"
    assert "step1 rejected" in failed["data"]["run"]["error_message"]


async def test_the_verification_rejects_tampered_wrong_secret_and_stale_deliveries(env: Env) -> None:
    headers, body = received(env)[0]
    signature = headers["X-Flowtrail-Signature"]
    assert verify(SECRET, body, signature)
    assert not verify(SECRET, body.replace(b'"event"', b'"evenT"', 1), signature)  # tampered body
    assert not verify(SECRET, body + b" ", signature)
    assert not verify("whsec_someone_else_entirely", body, signature)  # wrong secret
    stale = sign(SECRET, body, timestamp=int(time.time()) - 301)
    assert not verify(SECRET, body, stale)  # older than five minutes
    assert not verify(SECRET, body, "v1=abc") and not verify(SECRET, body, "garbage")


async def test_redeliver_sends_again_and_tenants_are_isolated(env: Env) -> None:
    async with env.client() as api:
        sub = (await api.get("/v1/webhooks")).json()["data"][0]
        delivery = (await api.get(f"/v1/webhooks/{sub['id']}/deliveries")).json()["data"][0]
        before = attempts(env, delivery["id"])
        r = await api.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")
        assert r.status_code == 202

        async def resent() -> bool:
            return attempts(env, delivery["id"]) > before

        await wait_until(resent, what="redelivered")
        # The other tenant sees no subscriptions and can touch none.
        async with env.client(key="other") as other:
            assert (await other.get("/v1/webhooks")).json()["data"] == []
            assert (await other.get(f"/v1/webhooks/{sub['id']}/deliveries")).status_code == 404
            assert (await other.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")).status_code == 404
            assert (await other.delete(f"/v1/webhooks/{sub['id']}")).status_code == 404
        bad = await api.post("/v1/webhooks", json={"url": hooks_url(env), "events": ["run.exploded"]})
        assert bad.status_code == 422 and "run.exploded" in bad.json()["error"]["message"]
        assert (await api.delete(f"/v1/webhooks/{sub['id']}")).status_code == 204


async def test_metrics_show_http_latency_by_route_runs_by_status_and_lag(env: Env) -> None:
    api = (await env.http.get(env.url("api") + "/metrics")).text
    projector = (await env.http.get(env.url("projector") + "/metrics")).text
    # One series per route template, not per id.
    assert 'flowtrail_http_request_seconds_count{method="GET",route="/v1/webhooks",service="api",status="200"}' in api
    assert 'route="/v1/webhooks/{subscription_id}/deliveries"' in api
    assert "run-bad" not in api and "run-ok" not in api
    assert 'flowtrail_projector_runs_finished_total{status="FAILED"}' in projector
    assert 'flowtrail_projector_runs_finished_total{status="SUCCEEDED"}' in projector
    assert "flowtrail_projector_lag_records{" in projector
    assert 'flowtrail_projector_webhook_deliveries_total{outcome="delivered"}' in projector


def _ended(run_id: str, event_type: str) -> list[Any]:
    """A run that started and then ended with `event_type` (any terminal event), as the executor writes it."""
    from schemas import events as ev

    started = run_events(run_id, tenant_id="t1", steps=0, start=datetime.now(UTC))[:3]  # requested, queued, started
    last = started[-1]
    ending = getattr(ev, event_type)(
        tenant_id="t1", run_id=run_id, flow_id=last.flow_id, flow_version=1, seq=3, occurred_at=last.occurred_at,
        causation_id=f"{run_id}:end", correlation_id=run_id, payload={"reason": f"ended {event_type}"},
    )  # fmt: skip
    return [*started, ending]


async def test_every_ending_sends_its_webhook_and_a_deleted_subscription_retries_nothing(env: Env) -> None:
    """One `run.<status>` per terminal status, derived from the status table; a subscription deleted while its
    deliveries are being retried stops them at once (marked failed, "subscription deleted")."""
    from schemas.events import TERMINAL_EVENT_STATUS

    names = sorted(f"run.{status.lower()}" for status in TERMINAL_EVENT_STATUS.values())
    assert len(names) == 8  # every terminal status of architecture.md: vocabulary
    async with env.client() as api:
        r = await api.post("/v1/webhooks", json={"url": hooks_url(env), "secret": SECRET, "events": names})
        assert r.status_code == 201, r.text
        sub = r.json()
        events = [e for t in TERMINAL_EVENT_STATUS for e in _ended(f"run-end-{t}", t)]
        await append_ledger(env.sandbox, events)

        async def all_delivered() -> list[dict[str, Any]] | None:
            data = (await api.get(f"/v1/webhooks/{sub['id']}/deliveries", params={"limit": 100})).json()["data"]
            return data if len(data) == 8 and all(d["status"] == "delivered" for d in data) else None

        deliveries = await wait_until(all_delivered, what="8 deliveries", logs=env.log_tails)
        assert sorted(d["event"] for d in deliveries) == names
        assert (await api.delete(f"/v1/webhooks/{sub['id']}")).status_code == 204

        # A receiver that is down: deliveries are retried until the subscription is deleted, then never again.
        down = await api.post("/v1/webhooks", json={"url": env.upstream.url + "/down",
                                                    "events": ["run.canceled"]})  # fmt: skip
        assert down.status_code == 201, down.text
        await append_ledger(env.sandbox, _ended("run-x", "RunCanceled"))

        async def retried() -> dict[str, Any] | None:
            data = (await api.get(f"/v1/webhooks/{down.json()['id']}/deliveries")).json()["data"]
            return data[0] if data and data[0]["attempts"] >= 2 and data[0]["status"] == "pending" else None

        await wait_until(retried, what="retried")
        assert (await api.delete(f"/v1/webhooks/{down.json()['id']}")).status_code == 204
        stopped = (await api.get(f"/v1/webhooks/{down.json()['id']}/deliveries")).json()["data"][0]
        assert stopped["status"] == "failed" and stopped["last_error"] == "subscription deleted"
        await asyncio.sleep(1.0)  # five backoff periods: nothing more is attempted
        after = (await api.get(f"/v1/webhooks/{down.json()['id']}/deliveries")).json()["data"][0]
        assert after["attempts"] == stopped["attempts"] and after["status"] == "failed"
