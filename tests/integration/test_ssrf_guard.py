"""The network guard on the paths that need the real database and broker: webhook and alert deliveries (a
refusal or a name that does not resolve is a recorded failed attempt and the batch goes on), connector verify
through the API app (a name that rebinds after registration is refused where verify connects), and the
brokers a real Kafka cluster advertises.

Network rule: nothing connects anywhere but loopback, no name is looked up on the network (FakeDNS answers
every lookup; the dial guard refuses any non-loopback connection httpcore is asked to make).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiokafka.client import AIOKafkaClient

from services.common import netguard
from services.common.db import create_pool
from services.common.netguard import BlockedAddress, KafkaGuard
from services.executor.adapters.actions_base import StepCall
from services.executor.adapters.steps import StepRunners
from services.projector.adapters import alerts, webhooks
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, Sandbox
from tests.harness import api_in_process
from tests.netguard_support import PUBLIC_LOOKING, Dials, FakeDNS, Listener

pytest_plugins = ["tests.netguard_fixtures"]  # dns, dials, listener


@pytest.fixture
async def pool(sandbox: Sandbox) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(sandbox.infra.database_url, sandbox.schema, min_size=1, max_size=4)
    await p.execute("INSERT INTO tenants (id, name) VALUES ('t1', 'T1') ON CONFLICT DO NOTHING")
    yield p
    await p.close()


def targets(port: int) -> list[str]:
    """Delivery URLs, the first due first: each must end as a recorded failed attempt, none may stall the rest."""
    return [
        "http://nowhere.test/hook",  # does not resolve: this one stalled the whole batch before
        f"http://rebind.test:{port}/hook",  # resolves to a public address once, loopback afterwards
        f"http://127.0.0.1:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://inside.test:{port}/hook",  # one public and one private address
        "http://[::1/hook",  # not a URL: raised out of the batch before
    ]


def script(dns: FakeDNS) -> None:
    dns.script("rebind.test", [PUBLIC_LOOKING], ["127.0.0.1"])
    dns.script("inside.test", [PUBLIC_LOOKING, "10.0.0.7"])


async def test_webhook_deliveries_record_refusals_and_unresolvable_hosts_and_the_batch_goes_on(
    pool: asyncpg.Pool, dns: FakeDNS, dials: Dials, listener: Listener
) -> None:
    script(dns)
    urls = targets(listener.port)
    start = datetime.now(UTC) - timedelta(minutes=5)
    for i, url in enumerate(urls):
        await pool.execute(
            "INSERT INTO webhook_subscriptions (id, tenant_id, environment, url, events, secret) "
            "VALUES ($1, 't1', 'PRODUCTION', $2, '{run.failed}', 'whsec_0123456789abcdef')",
            f"whk_{i}", url,
        )  # fmt: skip
        await pool.execute(
            "INSERT INTO webhook_deliveries (id, subscription_id, tenant_id, event, event_key, body, next_attempt_at) "
            "VALUES ($1, $2, 't1', 'run.failed', 'k', '{\"id\": \"x\"}', $3)",
            f"del_{i}", f"whk_{i}", start + timedelta(seconds=i),
        )  # fmt: skip
    dispatcher = webhooks.Dispatcher(pool, allow_private=False, backoff_s=10)
    try:
        assert await dispatcher.run_once() == len(urls)
    finally:
        await dispatcher.close()

    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM webhook_deliveries")}
    attempts = {r["delivery_id"]: r for r in await pool.fetch("SELECT * FROM webhook_attempts")}
    assert sorted(attempts) == sorted(rows)  # every delivery has its attempt: nothing stalled
    errors = [rows[f"del_{i}"]["last_error"] for i in range(len(urls))]
    assert all(rows[f"del_{i}"]["status"] == "pending" and rows[f"del_{i}"]["attempts"] == 1 for i in range(len(urls)))
    assert errors[0].startswith("unresolvable: cannot resolve nowhere.test")
    assert "ConnectError" in errors[1]  # dialled the address it checked (refused by the test), not loopback
    assert all(e.startswith("refused: ") and "private or reserved" in e for e in errors[2:5]), errors
    assert errors[5].startswith("refused: URL") and "not valid" in errors[5]
    assert dns.calls["rebind.test"] == 1
    assert dials.made == [(PUBLIC_LOOKING, listener.port)]
    assert listener.accepted == 0


async def test_alert_deliveries_record_refusals_and_unresolvable_hosts_and_the_batch_goes_on(
    pool: asyncpg.Pool, dns: FakeDNS, dials: Dials, listener: Listener
) -> None:
    script(dns)
    urls = targets(listener.port)
    now = datetime.now(UTC)
    await pool.execute(
        "INSERT INTO alert_rules (id, tenant_id, environment, name, flow_id, kind, params, channels, revisions, "
        "secret, created_at, updated_at) VALUES ('alr_1', 't1', 'PRODUCTION', 'r', 'f', 'failed_run', '{}', '[]', "
        "'[]', 'whsec_0123456789abcdef', $1, $1)",
        now,
    )  # fmt: skip
    for i, url in enumerate(urls):
        await pool.execute(
            "INSERT INTO alert_deliveries (id, alert_id, rule_id, tenant_id, action, channel_index, channel_type, "
            "target, body, next_attempt_at) VALUES ($1, 'alt_1', 'alr_1', 't1', 'trigger', $2, $3, $4, $5, $6)",
            f"ald_{i}", i, "webhook" if i % 2 else "slack", url, {"event": "alert.triggered", "text": "x"},
            now - timedelta(minutes=5) + timedelta(seconds=i),
        )  # fmt: skip
    dispatcher = alerts.Dispatcher(ProjectorSettings(webhook_allow_private_networks=False))
    try:
        assert await dispatcher.run_once(pool) == len(urls)
    finally:
        await dispatcher.close()

    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM alert_deliveries")}
    errors = [rows[f"ald_{i}"]["last_error"] for i in range(len(urls))]
    assert all(rows[f"ald_{i}"]["attempts"] == 1 and len(rows[f"ald_{i}"]["attempt_log"]) == 1 for i in range(6))
    assert errors[0].startswith("unresolvable: cannot resolve nowhere.test")
    assert "ConnectError" in errors[1]
    assert all(e.startswith("refused: ") and "private or reserved" in e for e in errors[2:5]), errors
    assert errors[5].startswith("refused: URL") and "not valid" in errors[5]
    assert dns.calls["rebind.test"] == 1 and dials.made == [(PUBLIC_LOOKING, listener.port)]
    assert listener.accepted == 0


async def test_connector_verify_checks_where_it_connects_after_the_name_rebinds(
    sandbox: Sandbox, dns: FakeDNS, dials: Dials, listener: Listener
) -> None:
    # Public while it is registered (the early check passes), loopback when verify connects: the rebinding.
    for name in ("web.test", "db.test", "kafka.test"):
        dns.script(name, [PUBLIC_LOOKING], ["127.0.0.1"])
    dns.script("gone.test", [PUBLIC_LOOKING], [])  # resolves at registration, not any more at verify
    port = listener.port
    cases: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
        ("http", {"url": f"http://web.test:{port}/health"}, ("VALIDATION", "blocked_address")),
        ("postgresql", {"dsn": f"postgresql://app@db.test:{port}/app"}, ("VALIDATION", "blocked_address")),
        ("kafka", {"url": f"kafka://kafka.test:{port}"}, ("VALIDATION", "blocked_address")),
        ("http", {"url": f"http://gone.test:{port}/"}, ("TRANSIENT", "unresolvable_host")),
    ]
    async with api_in_process(sandbox, connector_allow_private_networks=False) as api:
        for i, (kind, config, expected) in enumerate(cases):
            r = await api.post("/v1/connectors", json={"name": f"c{i}", "kind": kind, "config": config})
            assert r.status_code == 201, r.text
            verified = (await api.post(f"/v1/connectors/{r.json()['id']}/verify")).json()
            assert verified["ok"] is False, verified
            assert (verified["error"]["category"], verified["error"]["code"]) == expected, verified
        # Registration still answers a clear 422 for what is private already.
        r = await api.post("/v1/connectors", json={"name": "in", "kind": "http",
                                                   "config": {"url": f"http://127.0.0.1:{port}/"}})  # fmt: skip
        assert r.status_code == 422 and "private" in r.json()["error"]["message"]
    assert dials.public() == [] and listener.accepted == 0


async def test_the_brokers_a_cluster_advertises_are_checked_before_the_client_dials_them(infra: Infra) -> None:
    # The test cluster advertises loopback brokers: a guarded client may bootstrap (here the operator's own
    # bootstrap address) but never opens a connection to an advertised broker on a private address.
    client = AIOKafkaClient(bootstrap_servers=infra.kafka_bootstrap, client_id="netguard-test")
    guard = KafkaGuard()
    guard.install(client)
    try:
        await client.bootstrap()
        brokers = list(client.cluster.brokers())
        assert brokers
        with pytest.raises(BlockedAddress, match="private or reserved"):
            await guard.check_cluster(client)
        assert await client._get_conn(brokers[0].nodeId) is None  # refused: no connection opened
        assert client._conns == {} or all(k[0] == "bootstrap" for k in client._conns)
        assert isinstance(guard.refused, BlockedAddress)
    finally:
        await client.close()


async def test_a_guarded_dsn_connects_to_the_address_its_single_lookup_answered(
    infra: Infra, dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only here, loopback counts as public, so the guarded path reaches the real database: asyncpg gets the
    # checked address, and never looks the DSN's name up itself (a second lookup would be counted).
    monkeypatch.setattr(netguard, "is_blocked", lambda address: False)
    dns.script("pg.test", ["127.0.0.1"], ["10.9.9.9"])
    parts = urlsplit(infra.database_url)
    dsn = infra.database_url.replace(f"@{parts.hostname}:", "@pg.test:", 1)
    runners = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=4096)
    try:
        call = StepCall(run_id="run-1", step="s", action="database_query", attempt=1, started_at=datetime.now(UTC),
                        input={"dsn": dsn, "query": "SELECT 41 + 1 AS answer"}, timeout_s=20)  # fmt: skip
        outcome = await runners.run(call)
    finally:
        await runners.close()
    assert outcome.ok, outcome
    assert outcome.output["rows"] == [{"answer": 42}]
    assert dns.calls["pg.test"] == 1
