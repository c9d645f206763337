"""Tenant administration on the real stack (docs/tenants.md): the operator API creates a tenant whose first key works
and sees only its tenant, lists, shows and changes tenants within bounds, refuses tenant keys; the tenant's admin key
reads its retention; the CLI drives the same routes; and a shorter retention is applied by the projector's purge
while `flowtrail projector verify` stays equal.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deploy.launcher import tenants_cmd
from services.projector import retention
from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import (
    Env,
    KeySpec,
    api_error,
    api_in_process,
    append_ledger,
    assert_verify_equal,
    auth,
    connected,
    running,
    wait_projected,
    wait_sql,
)

pytestmark = pytest.mark.e2e

OPERATOR_KEY = "ft_op_" + "k" * 43
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"a": "t1", "reader": KeySpec("t1", scopes=["runs:read"])}
    settings = {"FLOWTRAIL_API_OPERATOR_KEY": OPERATOR_KEY, "FLOWTRAIL_PROJECTOR_RETENTION_INTERVAL_S": "0.3"}
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api"), env=settings) as env:
        yield env


async def _op(env: Env, method: str, path: str, **kwargs: Any) -> Any:
    return await env.http.request(method, env.url("api") + path, headers=auth(OPERATOR_KEY), **kwargs)


def _settings(tenant: dict[str, Any]) -> dict[str, Any]:
    """A tenant as the operator sees it, less what the purge loop moves on its own (every 0.3 s here)."""
    return {k: v for k, v in tenant.items() if k not in ("last_purge_at", "admin_key")}


async def _create(env: Env, **body: Any) -> dict[str, Any]:
    r = await _op(env, "POST", "/v1/admin/tenants", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_a_new_tenant_s_first_key_works_and_sees_only_its_tenant(env: Env) -> None:
    await append_ledger(env.sandbox, run_events("run_of_t1", tenant_id="t1"))
    await wait_projected(env, len(run_events("x")))
    assert (await env.ok("GET", "/v1/runs/run_of_t1"))["status"] == "SUCCEEDED"  # t1's key sees it

    made = await _create(env, name="Acme Corp", id="acme")
    assert (made["id"], made["name"], made["active_api_keys"]) == ("acme", "Acme Corp", 1)
    assert made["retention"] == {"metadata_days": 90, "payload_days": 7}  # the standard plan's periods
    assert made["quotas"] == {"max_active_runs": None}
    key = made["admin_key"]["key"]
    assert key.startswith("ft_live_") and made["admin_key"]["scopes"] == ["admin"]

    session = await env.ok("GET", "/v1/session", key)
    assert (session["tenant_id"], session["environment"]) == ("acme", "PRODUCTION")
    assert (await env.ok("GET", "/v1/runs", key))["data"] == []  # t1's run is not acme's
    api_error(await env.api("GET", "/v1/runs/run_of_t1", key), 404, "not_found")
    own = await env.ok("GET", "/v1/tenant", key)
    assert (own["id"], own["retention"]) == ("acme", {"metadata_days": 90, "payload_days": 7})
    assert "active_api_keys" not in own and "admin_key" not in own
    # The new admin key manages its own tenant's keys, and the key is never shown again.
    keys = await env.ok("GET", "/v1/api-keys", key)
    assert [k["id"] for k in keys["data"]] == [made["admin_key"]["id"]] and "key" not in keys["data"][0]

    # The same id twice is a conflict, and nothing changed.
    api_error(await _op(env, "POST", "/v1/admin/tenants", json={"name": "Other", "id": "acme"}), 409, "conflict")
    assert (await _op(env, "GET", "/v1/admin/tenants/acme")).json()["name"] == "Acme Corp"


async def test_list_and_show(env: Env) -> None:
    made = await _create(env, name="Listed", retention={"metadata_days": 396, "payload_days": 30},
                         quotas={"max_active_runs": 25}, environment="TESTING")  # fmt: skip
    assert made["id"].startswith("tn_") and made["admin_key"]["key"].startswith("ft_test_")
    shown = (await _op(env, "GET", f"/v1/admin/tenants/{made['id']}")).json()
    assert shown["retention"] == {"metadata_days": 396, "payload_days": 30}
    assert shown["quotas"] == {"max_active_runs": 25}
    assert _settings(made) == _settings(shown)

    r = await _op(env, "GET", "/v1/admin/tenants")
    assert r.status_code == 200, r.text
    ids = [t["id"] for t in r.json()["data"]]
    assert {"t1", made["id"]} <= set(ids) and ids == sorted(ids)
    first = (await _op(env, "GET", "/v1/admin/tenants", params={"limit": 1})).json()
    assert len(first["data"]) == 1 and first["has_more"] and first["next_after"] == ids[0]
    rest = (await _op(env, "GET", "/v1/admin/tenants", params={"after": ids[0], "limit": 1000})).json()
    assert [t["id"] for t in rest["data"]] == ids[1:] and rest["next_after"] is None

    api_error(await _op(env, "GET", "/v1/admin/tenants/nobody"), 404, "not_found")
    api_error(await _op(env, "GET", "/v1/admin/tenants?bogus=1"), 422, "validation_error")


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"retention": {"metadata_days": 0}}, "metadata_days"),
        ({"retention": {"metadata_days": 3651}}, "metadata_days"),
        ({"retention": {"payload_days": -1}}, "payload_days"),
        ({"retention": {"metadata_days": 10, "payload_days": 11}}, "may not exceed"),
        ({"retention": {"payload_days": 91}}, "may not exceed"),  # the tenant keeps runs 90 days
        ({"quotas": {"max_active_runs": 0}}, "max_active_runs"),
        ({"plan": "enterprise"}, "plan"),
    ],
)
async def test_out_of_bounds_settings_are_refused_with_422_and_change_nothing(
    env: Env, body: dict[str, Any], names: str
) -> None:
    await _op(env, "POST", "/v1/admin/tenants", json={"name": "Bounded", "id": "bounded"})
    before = _settings((await _op(env, "GET", "/v1/admin/tenants/bounded")).json())
    message = api_error(await _op(env, "PATCH", "/v1/admin/tenants/bounded", json=body), 422, "validation_error")
    assert names in message, message
    assert _settings((await _op(env, "GET", "/v1/admin/tenants/bounded")).json()) == before
    if "retention" in body:  # creating with the same periods is refused the same way
        r = await _op(env, "POST", "/v1/admin/tenants", json={"name": "Never", "id": "never", **body})
        api_error(r, 422, "validation_error")
        api_error(await _op(env, "GET", "/v1/admin/tenants/never"), 404, "not_found")


async def test_tenant_keys_are_refused_by_the_operator_routes(env: Env, tmp_path_factory: Any) -> None:
    routes = [("GET", "/v1/admin/tenants", None), ("GET", "/v1/admin/tenants/t1", None),
              ("POST", "/v1/admin/tenants", {"name": "Mine", "id": "mine"}),
              ("PATCH", "/v1/admin/tenants/t1", {"retention": {"metadata_days": 1, "payload_days": 1}})]  # fmt: skip
    for method, path, body in routes:
        for key in (env.keys["a"], env.keys["reader"], OPERATOR_KEY + "x"):  # an admin key is no operator key
            r = await env.api(method, path, key, json=body)
            assert "operator key" in api_error(r, 403, "forbidden")
        api_error(await env.http.request(method, env.url("api") + path, json=body), 401, "unauthorized")
    assert (await _op(env, "GET", "/v1/admin/tenants/t1")).json()["retention"]["metadata_days"] != 1
    api_error(await _op(env, "GET", "/v1/admin/tenants/mine"), 404, "not_found")
    # A tenant's retention is its admin's to read: a key without the admin scope is refused.
    api_error(await env.api("GET", "/v1/tenant", "reader"), 403, "forbidden")

    # An API with no operator key configured: the operator routes say so, for any token.
    async with api_in_process(env.sandbox, tenant="t1") as client:
        for token in (OPERATOR_KEY, env.keys["a"]):
            r = await client.get("/v1/admin/tenants", headers=auth(token))
            assert "FLOWTRAIL_API_OPERATOR_KEY" in api_error(r, 403, "operator_api_disabled")


def _args(job: str, **fields: Any) -> argparse.Namespace:
    return argparse.Namespace(job=job, **fields)


async def test_the_cli_creates_lists_shows_and_sets_retention(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    api = env.url("api")
    assert await tenants_cmd.tenants(_args("create", name="Cli Co", id="cli-co", testing=False), api, OPERATOR_KEY) == 0
    out = capsys.readouterr().out
    key = out.rsplit("store it now): ", 1)[1].strip()
    assert "tenant cli-co (Cli Co): runs kept 90 days, payloads 7 days" in out and key.startswith("ft_live_")

    await tenants_cmd.tenants(_args("set-retention", id="cli-co", metadata_days=30, payload_days=2), api, OPERATOR_KEY)
    assert "runs kept 30 days, payloads 2 days" in capsys.readouterr().out
    own = await env.ok("GET", "/v1/tenant", key)  # the tenant's own admin key sees the new periods
    assert own["retention"] == {"metadata_days": 30, "payload_days": 2}

    await tenants_cmd.tenants(_args("list"), api, OPERATOR_KEY)
    lines = {line.split("\t")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "metadata 30 d\tpayloads 2 d" in lines["cli-co"] and "t1" in lines
    await tenants_cmd.tenants(_args("show", id="cli-co"), api, OPERATOR_KEY)
    assert '"metadata_days": 30' in capsys.readouterr().out

    with pytest.raises(tenants_cmd.LauncherError, match="422 validation_error"):
        await tenants_cmd.tenants(_args("set-retention", id="cli-co", metadata_days=1, payload_days=5), api,
                                  OPERATOR_KEY)  # fmt: skip
    with pytest.raises(tenants_cmd.LauncherError, match="403 forbidden"):
        await tenants_cmd.tenants(_args("list"), api, env.keys["a"])


async def test_a_shorter_retention_set_by_the_operator_is_applied_and_verify_stays_equal(env: Env) -> None:
    made = await _create(env, name="Retained", id="retained")
    key = made["admin_key"]["key"]
    ancient = run_events("run_45d", tenant_id="retained", start=NOW - timedelta(days=45))
    old = run_events("run_10d", tenant_id="retained", start=NOW - timedelta(days=10))
    fresh = run_events("run_1h", tenant_id="retained", start=NOW - timedelta(hours=1))
    async with connected(env) as db:
        projected = await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets")
        await append_ledger(env.sandbox, ancient + old + fresh)
        await wait_projected(env, projected + len(ancient + old + fresh))
        # Under the default periods (90 and 7 days) the 45-day-old run stays, its payloads are blanked.
        await wait_sql(db, "SELECT count(*) = 2 FROM runs WHERE tenant_id = 'retained' AND payloads_purged",
                       what="payloads of the 45 and 10 day old runs blanked", logs=env.log_tails)  # fmt: skip
        assert {r["id"] for r in (await env.ok("GET", "/v1/runs", key))["data"]} == {"run_45d", "run_10d", "run_1h"}

        r = await _op(env, "PATCH", "/v1/admin/tenants/retained",
                      json={"retention": {"metadata_days": 30, "payload_days": 1}})  # fmt: skip
        assert r.status_code == 200 and r.json()["retention"] == {"metadata_days": 30, "payload_days": 1}, r.text
        await wait_sql(db, "SELECT count(*) = 0 FROM runs WHERE id = 'run_45d'", what="run_45d deleted by the purge",
                       logs=env.log_tails)  # fmt: skip
    api_error(await env.api("GET", "/v1/runs/run_45d", key), 404, "not_found")
    assert (await env.ok("GET", "/v1/runs/run_10d", key))["trigger"]["payload"] is None
    assert (await env.ok("GET", "/v1/runs/run_1h", key))["trigger"]["payload"] == {"n": "run_1h"}
    shown = (await _op(env, "GET", "/v1/admin/tenants/retained")).json()
    assert shown["last_purge_at"] is not None
    # The ledger keeps every event; a replay with the recorded purge marks equals the live read models.
    await assert_verify_equal(env.sandbox)


async def test_a_purge_deletes_in_bounded_batches_and_records_its_mark_with_the_last(env: Env) -> None:
    await _create(env, name="Batched", id="batched")
    events = [e for i in range(5) for e in run_events(f"run_b{i}", tenant_id="batched", start=NOW - timedelta(days=30))]
    async with connected(env) as db:
        projected = await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets")
        await append_ledger(env.sandbox, events)
        await wait_projected(env, projected + len(events))
        assert await db.fetchval("SELECT count(*) FROM runs WHERE tenant_id = 'batched'") == 5
        mark = retention.Marks("batched", NOW - timedelta(days=20), NOW - timedelta(days=20))
        result = await retention.apply_marks(db, [mark], batch=2)  # three transactions: 2, 2 and the last 1
        assert result.runs_deleted == 5
        assert await db.fetchval("SELECT count(*) FROM runs WHERE tenant_id = 'batched'") == 0
        assert await db.fetchval("SELECT count(*) FROM purged_runs WHERE run_id LIKE 'run_b%'") == 5
        recorded = {m.tenant_id: m for m in await retention.recorded_marks(db)}["batched"]
        assert recorded.runs_before >= mark.runs_before
    await assert_verify_equal(env.sandbox)
