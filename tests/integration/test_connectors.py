"""Connectors on real processes: verify makes real checks (a loopback HTTP server, the test PostgreSQL, the
test Kafka broker) and classifies what fails; an AUTH failure in the ledger degrades a connector, offers one
signed `connector.degraded` webhook per transition, and a later successful step using it makes it ok again;
the same events in any order give the same health row; tenants never see each other's connectors; credentials
never appear in an answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from schemas import events as ev
from schemas.events import EventBase, TriggerInfo
from services.common.db import connect
from services.common.webhooks import verify
from services.projector.adapters.store import Positioned, apply_batch
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import free_port
from tests.harness import (
    FAST_WEBHOOKS,
    Env,
    KeySpec,
    answer,
    api_in_process,
    append_ledger,
    delayed,
    running,
    stub_upstream,
    wait_until,
)

SECRET = "whsec_connectors_0123456789"
TOKEN = "Bearer s3cr3t-token-abc"
PASSWORD = "hunter2-not-shown"


async def private(request: web.Request) -> web.Response:
    if request.headers.get("Authorization") == "Bearer right-token":
        return web.Response(status=200)
    return web.Response(status=401, text="expired token")


# A loopback system to check (env.upstream): /health answers 200, /private 401 without the right token, /slow never
# answers in time (the upstream being slow is the scenario; the test waits for the verify only); /hooks receives
# webhook deliveries.
UPSTREAM = {
    ("GET", "/health"): answer("ok"),
    ("GET", "/private"): private,
    ("GET", "/slow"): delayed(5, answer()),
    ("POST", "/hooks"): answer(),
}


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"admin": "t1", "reader": KeySpec("t1", scopes=("runs:read",)), "other": "t2"}
    settings = {**FAST_WEBHOOKS, "FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true"}
    async with (
        stub_upstream(UPSTREAM) as upstream,
        running(infra, tmp_path_factory, keys=keys, services=("projector", "api"), env=settings,
                upstream=upstream) as env,
    ):  # fmt: skip
        yield env


def hooks(env: Env) -> list[tuple[dict[str, str], bytes]]:
    """The webhook deliveries /hooks was sent, in order: (headers, body)."""
    return [(dict(c.headers), c.body) for c in env.upstream.seen("/hooks")]


async def _create(api: httpx.AsyncClient, name: str, kind: str, **config: Any) -> dict[str, Any]:
    r = await api.post("/v1/connectors", json={"name": name, "kind": kind, "config": config})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _verify(api: httpx.AsyncClient, connector: dict[str, Any]) -> dict[str, Any]:
    r = await api.post(f"/v1/connectors/{connector['id']}/verify")
    assert r.status_code == 200, r.text
    assert PASSWORD not in r.text and "s3cr3t" not in r.text
    return dict(r.json())


def _with_password(dsn: str, user: str | None = None) -> str:
    """The test database trusts loopback logins, so any password connects; it must never be shown."""
    scheme, rest = dsn.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{scheme}://{user or userinfo.split(':')[0]}:{PASSWORD}@{host}"


# ---------------------------------------------------------------- verify


async def test_verify_http_reports_ok_auth_and_unreachable(env: Env) -> None:
    async with env.client() as api:
        healthy = await _create(api, "shop", "http", url=env.upstream.url + "/api/v2", health_path="/health")
        result = await _verify(api, healthy)
        assert result["ok"] is True and result["detail"]["status_code"] == 200
        assert result["detail"]["url"] == env.upstream.url + "/health" and result["latency_ms"] > 0

        locked = await _create(api, "erp", "http", url=env.upstream.url + "/private", headers={"Authorization": TOKEN})
        assert locked["config"]["headers"] == {"Authorization": "***"}
        result = await _verify(api, locked)
        assert result["ok"] is False and "detail" not in result
        assert result["error"]["category"] == "AUTH" and result["error"]["status_code"] == 401

        closed = await _create(api, "gone", "http", url=f"http://127.0.0.1:{free_port()}/")
        result = await _verify(api, closed)
        assert result["ok"] is False and result["error"]["category"] == "TRANSIENT"
        assert result["error"]["code"] == "network"

        slow = await _create(api, "slow", "http", url=env.upstream.url + "/slow", timeout_s=0.3)
        began = time.monotonic()
        result = await _verify(api, slow)
        assert result["ok"] is False and result["error"]["category"] == "TRANSIENT"
        assert result["error"]["code"] == "timeout" and time.monotonic() - began < 3

        # The last verify is kept on the connector, and the token stays hidden there too.
        shown = (await api.get(f"/v1/connectors/{locked['id']}")).json()
        assert shown["last_verify"]["error"]["category"] == "AUTH" and shown["last_verified_at"] is not None
        assert "s3cr3t" not in (await api.get("/v1/connectors")).text


async def test_verify_postgresql_connects_for_real_and_a_refused_login_is_auth(env: Env) -> None:
    dsn = env.sandbox.infra.database_url
    async with env.client() as api:
        good = await _create(api, "warehouse", "postgresql", dsn=_with_password(dsn))
        assert PASSWORD not in str(good) and "***" in good["config"]["dsn"]
        result = await _verify(api, good)
        assert result["ok"] is True and result["detail"]["server_version"][:2].isdigit()

        # The test cluster trusts loopback logins, so a wrong password still connects: a role the server does
        # not know is the login it refuses (SQLSTATE 28000), as a revoked credential would be.
        ghost = await _create(api, "ghost", "postgresql", dsn=_with_password(dsn, f"nobody_{uuid.uuid4().hex[:8]}"))
        result = await _verify(api, ghost)
        assert result["ok"] is False and result["error"]["category"] == "AUTH" and result["error"]["code"] == "28000"

        down = await _create(api, "down", "postgresql", dsn=f"postgresql://u:{PASSWORD}@127.0.0.1:{free_port()}/db")
        result = await _verify(api, down)
        assert result["ok"] is False and result["error"]["category"] == "TRANSIENT"


async def test_verify_kafka_fetches_cluster_metadata(env: Env) -> None:
    async with env.client() as api:
        bus = await _create(api, "bus", "kafka", url=f"kafka://{env.sandbox.infra.kafka_bootstrap}")
        result = await _verify(api, bus)
        assert result["ok"] is True and result["detail"]["brokers"] >= 1 and result["detail"]["cluster_id"]
        dead = await _create(api, "dead-bus", "kafka", url=f"kafka://127.0.0.1:{free_port()}", timeout_s=3)
        result = await _verify(api, dead)
        assert result["ok"] is False and result["error"]["category"] == "TRANSIENT"


# ---------------------------------------------------------------- create, read, delete


async def test_names_are_unique_bodies_are_checked_and_writes_need_admin(env: Env) -> None:
    async with env.client() as api:
        await _create(api, "dup", "http", url=env.upstream.url)
        r = await api.post("/v1/connectors", json={"name": "dup", "kind": "http", "config": {"url": env.upstream.url}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        bad = [
            {"name": "x", "kind": "http", "config": {"url": env.upstream.url}, "colour": "red"},  # unknown field
            {"name": "x", "kind": "http", "config": {"url": env.upstream.url, "password": "p"}},
            {"name": "x", "kind": "postgresql", "config": {"url": "postgresql://h/db"}},  # dsn, not url
            {"name": "x", "kind": "kafka", "config": {"url": "http://broker:9092"}},
            {"name": "x", "kind": "ftp", "config": {"url": "ftp://h"}},
            {"name": "", "kind": "http", "config": {"url": env.upstream.url}},
        ]
        for body in bad:
            r = await api.post("/v1/connectors", json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", body
        assert (await api.get("/v1/connectors/con_missing")).status_code == 404

        doomed = await _create(api, "doomed", "http", url=env.upstream.url)
        assert (await api.delete(f"/v1/connectors/{doomed['id']}")).status_code == 204
        assert (await api.get(f"/v1/connectors/{doomed['id']}")).json()["error"]["code"] == "not_found"
        assert (await api.delete(f"/v1/connectors/{doomed['id']}")).status_code == 404
    async with env.client(key="reader") as reader:
        assert (await reader.get("/v1/connectors")).status_code == 200
        r = await reader.post("/v1/connectors", json={"name": "r", "kind": "http", "config": {"url": env.upstream.url}})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        some = (await reader.get("/v1/connectors")).json()["data"][0]
        assert (await reader.post(f"/v1/connectors/{some['id']}/verify")).status_code == 403


async def test_private_addresses_are_refused_unless_the_deployment_allows_them(sandbox: Sandbox) -> None:
    async with api_in_process(sandbox) as api:
        for kind, config in [
            ("http", {"url": "http://127.0.0.1:8080/health"}),
            ("http", {"url": "http://10.0.0.8/", "health_path": "/status"}),
            ("http", {"url": "http://[::1]:9000/"}),
            ("postgresql", {"dsn": f"postgresql://app:{PASSWORD}@10.1.2.3/db"}),
            ("kafka", {"url": "kafka://192.168.1.5:9092"}),
        ]:
            r = await api.post("/v1/connectors", json={"name": "inside", "kind": kind, "config": config})
            assert r.status_code == 422, r.text
            assert "private" in r.json()["error"]["message"] and PASSWORD not in r.text
        assert (await api.get("/v1/connectors")).json()["meta"]["total"] == 0


# ---------------------------------------------------------------- health from the ledger, and the webhook


def failing_run(run_id: str, at: datetime, connector: str, *, tenant_id: str = "t1") -> list[EventBase]:
    """A run whose `push` step, using `connector`, is refused with a 401: the executor's events for it."""
    error = {"category": "AUTH", "message": "POST https://crm.example/orders answered 401 (token expired)",
             "status_code": 401}  # fmt: skip
    return _run(run_id, at, tenant_id, [
        (ev.StepStarted, {"step": "push", "action": "http_request", "input": {"connector": connector, "url": "/o"}}),
        (ev.ConnectorDegraded, {"connector": connector, "step": "push", "error": error}),
        (ev.StepFailed, {"step": "push", "error": error}),
        (ev.RunFailed, {"failed_step": "push", "error": error}),
    ])  # fmt: skip


def succeeding_run(run_id: str, at: datetime, connector: str, *, tenant_id: str = "t1") -> list[EventBase]:
    """A sync run reading from `connector` (`source.connector`) that succeeds."""
    step_input = {"source": {"connector": connector, "entity": "order"}, "destination": {"connector": "ledger"}}
    return _run(run_id, at, tenant_id, [
        (ev.StepStarted, {"step": "sync", "action": "sync_records", "input": step_input}),
        (ev.StepSucceeded, {"step": "sync", "output": {"counters": {"read": 1}}}),
        (ev.RunSucceeded, {}),
    ])  # fmt: skip


def _run(run_id: str, at: datetime, tenant_id: str, body: list[tuple[Any, dict[str, Any]]]) -> list[EventBase]:
    head: list[tuple[Any, dict[str, Any]]] = [
        (ev.RunRequested, {"trigger": TriggerInfo(type="api"), "flow_name": "Orders to CRM"}),
        (ev.RunQueued, {}),
        (ev.RunStarted, {}),
    ]
    return [
        cls(tenant_id=tenant_id, run_id=run_id, flow_id="orders-crm", flow_version=1, seq=seq,
            occurred_at=at + timedelta(milliseconds=10 * seq), causation_id=f"{run_id}:c{seq}", correlation_id=run_id,
            payload=payload)
        for seq, (cls, payload) in enumerate(head + body)
    ]  # fmt: skip


async def test_auth_failures_degrade_a_connector_once_and_a_later_success_clears_it(env: Env) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0)
    async with env.client() as api:
        r = await api.post("/v1/webhooks", json={"url": env.upstream.url + "/hooks", "secret": SECRET,
                                                 "events": ["connector.degraded"]})  # fmt: skip
        assert r.status_code == 201, r.text
        subscription = r.json()["id"]
        flow = {"id": "orders-crm", "name": "Orders to CRM", "steps": [
            {"name": "push", "action": "http_request", "input": {"connector": "crm", "url": "https://crm.example/o"}}
        ]}  # fmt: skip
        assert (await api.post("/v1/flows", json=flow)).status_code in (201, 202)
        crm = await _create(api, "crm", "http", url=env.upstream.url + "/health")

        async def health() -> dict[str, Any]:
            return dict((await api.get(f"/v1/connectors/{crm['id']}")).json())

        async def flow_listed() -> dict[str, Any] | None:
            h = await health()
            return h if h["flows"] else None

        async def connector_deliveries() -> list[dict[str, Any]]:
            data = (await api.get(f"/v1/webhooks/{subscription}/deliveries")).json()["data"]
            return [d for d in data if d["event"] == "connector.degraded"]

        first = await wait_until(flow_listed)
        assert first["status"] == "ok" and first["health"]["last_error"] is None
        assert first["flows"] == [
            {
                "id": "orders-crm",
                "name": "Orders to CRM",
                "steps": [{"step": "push", "action": "http_request", "role": "connector"}],
            }
        ]

        # Two runs refused while degraded, each delivered twice by Kafka: degraded once, one webhook.
        a, b = failing_run("run-a", t0, "crm"), failing_run("run-b", t0 + timedelta(seconds=1), "crm")
        await append_ledger(env.sandbox, a + b + a + b)

        async def shows_run_b() -> dict[str, Any] | None:
            h = await health()
            return h if (h["health"]["last_failure"] or {}).get("run_id") == "run-b" else None

        degraded = await wait_until(shows_run_b)
        assert degraded["status"] == "degraded"
        assert datetime.fromisoformat(degraded["health"]["degraded_since"]) == a[4].occurred_at
        assert degraded["health"]["last_error"]["category"] == "AUTH"
        assert degraded["health"]["last_failure"]["step"] == "push"
        listed = (await api.get("/v1/connectors", params={"status": "degraded"})).json()
        assert [c["name"] for c in listed["data"]] == ["crm"] and listed["meta"]["total"] == 1

        async def delivered() -> list[dict[str, Any]] | None:
            found = await connector_deliveries()
            return found if found and all(d["status"] == "delivered" for d in found) else None

        deliveries = await wait_until(delivered)
        assert len(deliveries) == 1
        headers, raw = next((h, b) for h, b in hooks(env) if h["X-Flowtrail-Event"] == "connector.degraded")
        assert verify(SECRET, raw, headers["X-Flowtrail-Signature"])
        body = orjson.loads(raw)
        assert body["data"]["connector"]["name"] == "crm" and body["data"]["run_id"] == "run-a"
        assert body["data"]["flow"] == {"id": "orders-crm", "version": 1, "name": "Orders to CRM"}
        assert body["data"]["step"] == "push" and body["data"]["error"]["category"] == "AUTH"

        # Recovery: a later run whose step reads from crm succeeds. Its StepStarted is projected first, so
        # the success is matched to the input recorded in an earlier batch.
        c = succeeding_run("run-c", t0 + timedelta(seconds=2), "crm")
        await append_ledger(env.sandbox, c[:4])

        async def running() -> bool:
            return bool((await api.get("/v1/runs/run-c")).json().get("status") == "RUNNING")

        await wait_until(running)
        await append_ledger(env.sandbox, c[4:])

        async def recovered() -> dict[str, Any] | None:
            h = await health()
            return h if h["status"] == "ok" else None

        ok = await wait_until(recovered)
        assert ok["health"]["degraded_since"] is None and ok["health"]["last_success_run_id"] == "run-c"
        assert ok["health"]["last_error"]["category"] == "AUTH"  # the last failure stays on record

        # Refused again after the recovery: a new transition, a second webhook.
        d = failing_run("run-d", t0 + timedelta(seconds=3), "crm")
        await append_ledger(env.sandbox, d)

        async def two() -> list[dict[str, Any]] | None:
            found = await connector_deliveries()
            return found if len(found) == 2 else None

        assert len(await wait_until(two)) == 2
        assert (await health())["status"] == "degraded"


async def test_tenants_never_see_each_others_connectors_or_health(env: Env) -> None:
    async with env.client() as mine, env.client(key="other") as other:
        shop = (await mine.get("/v1/connectors")).json()["data"][0]
        assert (await other.get("/v1/connectors")).json() == {"data": [], "next_cursor": None,
                                                              "meta": {"total": 0, "has_more": False}}  # fmt: skip
        assert (await other.get(f"/v1/connectors/{shop['id']}")).status_code == 404
        assert (await other.post(f"/v1/connectors/{shop['id']}/verify")).status_code == 404
        assert (await other.delete(f"/v1/connectors/{shop['id']}")).status_code == 404
        # The same name in another tenant is another connector, with its own health.
        theirs = await _create(other, "billing", "http", url=env.upstream.url)
        mine_billing = await _create(mine, "billing", "http", url=env.upstream.url)
        t0 = datetime.now(UTC)
        await append_ledger(env.sandbox, failing_run("run-t2", t0, "billing", tenant_id="t2"))

        async def theirs_degraded() -> bool:
            return bool((await other.get(f"/v1/connectors/{theirs['id']}")).json()["status"] == "degraded")

        await wait_until(theirs_degraded)
        assert (await mine.get(f"/v1/connectors/{mine_billing['id']}")).json()["status"] == "ok"


async def test_health_is_the_same_whatever_order_and_batches_the_events_arrive_in(infra: Infra) -> None:
    """Live and rebuilt projections must agree (invariant 1): one batch in log order against one event per batch
    with the runs interleaved newest first (each run's own events stay in order, as partitions keep them)."""
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    runs = [
        failing_run("r1", t0, "crm"),
        succeeding_run("r2", t0 + timedelta(seconds=1), "crm"),
        failing_run("r3", t0 + timedelta(seconds=2), "crm"),
        failing_run("r4", t0 + timedelta(seconds=3), "crm"),
        succeeding_run("r5", t0 + timedelta(seconds=4), "erp"),
        failing_run("r6", t0 + timedelta(seconds=5), "erp"),
    ]
    in_order = [e for run in runs for e in run]
    # r3's and r4's failures land before r2's success: the degraded period then restarts at r3.
    late = [runs[i] for i in (0, 2, 3, 1, 5, 4)]
    shuffled = [run[i] for i in range(max(map(len, runs))) for run in late if i < len(run)]
    results = []
    for arrival, batch_size in ((in_order, len(in_order)), (shuffled, 1)):
        async with make_sandbox(infra) as box:
            conn = await connect(infra.database_url, box.schema)
            try:
                positioned = [Positioned("ledger", 0, i, e) for i, e in enumerate(arrival)]
                for i in range(0, len(positioned), batch_size):
                    await apply_batch(conn, "g", positioned[i : i + batch_size])
                rows = await conn.fetch("SELECT * FROM connector_health ORDER BY tenant_id, connector")
                results.append([dict(r) for r in rows])
            finally:
                await conn.close()
    live, replayed = results
    assert live == replayed
    crm, erp, ledger = live  # `ledger` is the sync runs' destination: used successfully, never refused
    assert ledger["status"] == "ok" and ledger["last_success_run_id"] == "r5"
    # crm: r2 cleared r1; degraded again since r3's failure (r4's does not move it), the latest error r4's.
    assert crm["status"] == "degraded" and crm["degraded_since"] == runs[2][4].occurred_at
    assert crm["last_failure_run_id"] == "r4" and crm["last_success_run_id"] == "r2"
    assert erp["status"] == "degraded" and erp["degraded_since"] == runs[5][4].occurred_at
