"""The secrets store's API on a real API process and PostgreSQL: admin scope, the key's tenant and environment
only, values never answered and stored only encrypted, rotation by writing again; connectors using a stored
secret; `flowtrail secrets rotate-key` moving every stored ciphertext to a new key."""

from __future__ import annotations

import asyncio
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from pydantic import SecretStr

from deploy.launcher.cli import _rotate_key
from deploy.launcher.errors import LauncherError
from services.common.auth import ensure_tenant
from services.common.crypto import (
    Keyring,
    encode_key,
    encrypt_inline,
    ensure_key_file,
    inline_context,
    key_id,
    new_key,
    read_key_file,
)
from services.common.secretstore import put_secret, read_secrets
from services.common.settings import CommonSettings
from tests.conftest import Infra, Sandbox
from tests.harness import Env, KeySpec, db_rows, running, stub_upstream

VALUE = f"sk-live-{uuid.uuid4().hex}"


async def health(request: web.Request) -> web.Response:
    """A connector's health check (env.upstream): healthy only for the secret as a bearer token."""
    return web.Response(status=200 if request.headers.get("Authorization") == f"Bearer {VALUE}" else 401)


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {
        "admin": "t1",
        "testing": KeySpec("t1", environment="TESTING"),
        "writer": KeySpec("t1", scopes=("runs:read", "runs:write", "flows:write")),
        "other": "t2",
    }
    async with (
        stub_upstream({("GET", "/health"): health}) as upstream,
        running(infra, tmp_path_factory, keys=keys, services=("api",), upstream=upstream,
                env={"FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true"}) as env,
    ):  # fmt: skip
        yield env


async def test_a_secret_is_written_listed_rotated_and_deleted_without_its_value_ever_answered(env: Env) -> None:
    async with env.client() as api:
        r = await api.put("/v1/secrets/shop_token", json={"value": VALUE})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["name"] == "shop_token" and created["version"] == 1 and created["environment"] == "PRODUCTION"
        assert created["reference"] == "{{ secrets.shop_token }}"
        listed = (await api.get("/v1/secrets")).json()["data"]
        assert [s["name"] for s in listed] == ["shop_token"]
        await asyncio.sleep(0.01)
        r = await api.put("/v1/secrets/shop_token", json={"value": VALUE + "-2"})
        assert r.status_code == 200, r.text
        rotated = r.json()
        assert rotated["version"] == 2 and rotated["created_at"] == created["created_at"]
        assert rotated["last_rotated_at"] > created["last_rotated_at"]
        one = await api.get("/v1/secrets/shop_token")
        assert one.status_code == 200 and one.json()["last_rotated_at"] == rotated["last_rotated_at"]
        answers = [r.text, one.text, (await api.get("/v1/secrets")).text]
        assert not [a for a in answers if VALUE in a]
        (row,) = await db_rows(env, "SELECT value FROM secrets WHERE tenant_id = 't1' AND name = 'shop_token'")
        assert row["value"].startswith("enc:v1:") and VALUE not in row["value"]

        r = await api.delete("/v1/secrets/shop_token")
        assert r.status_code == 204
        assert (await api.get("/v1/secrets/shop_token")).status_code == 404
        assert (await api.delete("/v1/secrets/shop_token")).json()["error"]["code"] == "not_found"


async def test_names_values_and_scope_are_checked(env: Env) -> None:
    async with env.client() as api:
        for bad in ("1abc", "has-dash", "x" * 129):
            r = await api.put(f"/v1/secrets/{bad}", json={"value": "v"})
            assert r.status_code == 422, (bad, r.text)
        assert (await api.put("/v1/secrets/ok", json={"value": ""})).status_code == 422
        assert (await api.put("/v1/secrets/ok", json={"value": "v", "extra": 1})).status_code == 422
    async with env.client(key="writer") as api:
        for r in (await api.put("/v1/secrets/ok", json={"value": "v"}), await api.get("/v1/secrets"),
                  await api.delete("/v1/secrets/ok")):  # fmt: skip
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert (await env.http.get(env.url("api") + "/v1/secrets")).status_code == 401


async def test_tenants_and_environments_never_see_each_others_secrets(env: Env) -> None:
    async with env.client() as t1, env.client(key="other") as t2, env.client(key="testing") as test:
        assert (await t1.put("/v1/secrets/shared_name", json={"value": "t1-value"})).status_code == 201
        assert [s["name"] for s in (await t2.get("/v1/secrets")).json()["data"]] == []
        assert (await t2.get("/v1/secrets/shared_name")).status_code == 404
        assert (await t2.delete("/v1/secrets/shared_name")).status_code == 404
        assert (await t2.put("/v1/secrets/shared_name", json={"value": "t2-value"})).status_code == 201
        assert [s["name"] for s in (await test.get("/v1/secrets")).json()["data"]] == []
        assert (await test.put("/v1/secrets/shared_name", json={"value": "test-value"})).json()["version"] == 1
        assert (await t1.get("/v1/secrets/shared_name")).json()["version"] == 1
    rows = await db_rows(env, "SELECT tenant_id, environment, value FROM secrets WHERE name = 'shared_name' "
                            "ORDER BY tenant_id, environment")  # fmt: skip
    assert [(r["tenant_id"], r["environment"]) for r in rows] == [("t1", "PRODUCTION"), ("t1", "TESTING"),
                                                                  ("t2", "PRODUCTION")]  # fmt: skip
    keyring = Keyring.from_settings(CommonSettings(state_dir=env.sandbox.infra.state_dir))
    conn = await env.db()
    try:
        assert await read_secrets(conn, keyring, "t2", "PRODUCTION", ["shared_name"]) == {"shared_name": "t2-value"}
        # A row copied under another tenant does not open: the ciphertext is bound to its tenant and name.
        t1_value = rows[0]["value"]
        await conn.execute("UPDATE secrets SET value = $1 WHERE tenant_id = 't2' AND name = 'shared_name'", t1_value)
        with pytest.raises(ValueError, match="does not open"):
            await read_secrets(conn, keyring, "t2", "PRODUCTION", ["shared_name"])
    finally:
        await conn.close()


async def test_a_connector_uses_a_stored_secret_and_keeps_its_own_credentials_encrypted(env: Env) -> None:
    async with env.client() as api:
        assert (await api.put("/v1/secrets/health_token", json={"value": VALUE})).status_code in (200, 201)
        body = {"name": f"svc-{uuid.uuid4().hex[:6]}", "kind": "http",
                "config": {"url": env.upstream.url, "health_path": "/health",
                           "headers": {"Authorization": "Bearer {{ secrets.health_token }}",
                                       "X-Api-Key": "inline-key-42424242"}}}  # fmt: skip
        r = await api.post("/v1/connectors", json=body)
        assert r.status_code == 201, r.text
        connector = r.json()
        assert connector["config"]["headers"] == {"Authorization": "***", "X-Api-Key": "***"}
        r = await api.post(f"/v1/connectors/{connector['id']}/verify")
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        assert env.upstream.seen("/health")[-1].headers["Authorization"] == f"Bearer {VALUE}"
        assert VALUE not in r.text
        (row,) = await db_rows(env, "SELECT config::text AS c FROM connectors WHERE id = $1", connector["id"])
        assert (
            "inline-key-42424242" not in row["c"] and "enc:v1:" in row["c"] and "{{ secrets.health_token }}" in row["c"]
        )

        assert (await api.delete("/v1/secrets/health_token")).status_code == 204
        r = await api.post(f"/v1/connectors/{connector['id']}/verify")
        assert r.status_code == 422 and r.json()["error"]["code"] == "secret_not_found", r.text


async def test_rotate_key_moves_stored_ciphertexts_to_a_new_key_and_old_ones_still_open(
    sandbox: Sandbox, db: asyncpg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "secrets.key"
    settings = CommonSettings(database_url=sandbox.infra.database_url, database_schema=sandbox.schema,
                              state_dir=tmp_path)  # fmt: skip
    before = Keyring(ensure_key_file(path), path)
    flow_token = before.encrypt("flow-inline-1", inline_context("t1"))  # as the flows topic holds it, never rewritten
    await ensure_tenant(db, "t1", "T1")
    await put_secret(db, before, "t1", "PRODUCTION", "api_token", "stored-1")
    config = encrypt_inline({"dsn": "postgresql://app:pw-1@db.example/wh"}, before, inline_context("t1"))
    await db.execute("INSERT INTO connectors (tenant_id, id, name, kind, config) VALUES ('t1', 'con_1', 'wh', "
                     "'postgresql', $1)", config)  # fmt: skip
    rotated_at = await db.fetchval("SELECT last_rotated_at FROM secrets WHERE name = 'api_token'")

    assert await _rotate_key(settings) == 0
    printed = capsys.readouterr().out
    assert "re-encrypted 1 of 1 stored secret(s) and 1 of 1 connector config(s)" in printed
    assert "flows topic" in printed

    after = Keyring(read_key_file(path), path)
    assert after.primary != before.primary and len(after.key_ids) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    value = await db.fetchval("SELECT value FROM secrets WHERE name = 'api_token'")
    assert value.startswith(f"enc:v1:{after.primary}:")
    assert await read_secrets(db, after, "t1", "PRODUCTION", ["api_token"]) == {"api_token": "stored-1"}
    assert await db.fetchval("SELECT last_rotated_at FROM secrets WHERE name = 'api_token'") == rotated_at
    dsn = (await db.fetchval("SELECT config FROM connectors WHERE id = 'con_1'"))["dsn"]
    assert f"enc:v1:{after.primary}:" in dsn
    assert after.decrypt(flow_token, inline_context("t1")) == "flow-inline-1"  # the old key is kept
    # A process that loaded the keyring before the rotation still reads the re-encrypted secret.
    assert await read_secrets(db, before, "t1", "PRODUCTION", ["api_token"]) == {"api_token": "stored-1"}


async def test_bootstrap_publishes_demo_credentials_encrypted_and_once(sandbox: Sandbox, tmp_path: Path) -> None:
    from deploy.launcher.bootstrap import publish_if_changed
    from deploy.launcher.demo_flows import demo_flows
    from tests.e2e.test_secrets_e2e import _dump_kafka

    settings = CommonSettings(kafka_bootstrap=sandbox.infra.kafka_bootstrap, topic_prefix=sandbox.topics.prefix,
                              secrets_key_file=str(tmp_path / "secrets.key"))  # fmt: skip
    flows = demo_flows()
    first = await publish_if_changed(settings, flows)
    assert await publish_if_changed(settings, flows) == first  # the same definitions: no new version
    topic = await _dump_kafka(sandbox)
    assert b"enc:v1:" in topic and b"ft_live_not-a-real-key" not in topic


async def test_reencrypt_only_moves_stored_secrets_to_the_first_key_of_the_variable(
    sandbox: Sandbox, db: asyncpg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = new_key()
    await ensure_tenant(db, "t1", "T1")
    await put_secret(db, Keyring([old]), "t1", "TESTING", "api_token", "stored-2")
    newer = new_key()
    keys = SecretStr(f"{encode_key(newer)},{encode_key(old)}")
    settings = CommonSettings(database_url=sandbox.infra.database_url, database_schema=sandbox.schema,
                              state_dir=tmp_path, secrets_key=keys)  # fmt: skip
    with pytest.raises(LauncherError, match="reencrypt-only"):
        await _rotate_key(settings)
    assert await _rotate_key(settings, reencrypt_only=True) == 0
    assert "re-encrypted 1 of 1 stored secret(s)" in capsys.readouterr().out
    value = await db.fetchval("SELECT value FROM secrets WHERE name = 'api_token'")
    assert value.startswith(f"enc:v1:{key_id(newer)}:")
    assert await read_secrets(db, Keyring([newer]), "t1", "TESTING", ["api_token"]) == {"api_token": "stored-2"}
    assert not (tmp_path / "secrets.key").exists()  # the variable's keys, no file
