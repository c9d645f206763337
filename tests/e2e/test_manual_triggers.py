"""Manual triggers and nested runs on the real stack (docs/intake.md#manual-triggers-and-nested-runs): a trigger marked
`X-Flowtrail-Trigger: manual` — the console's form, `flowtrail trigger` — records `manual` with the key as its caller;
`ap-parent-run-id` links a run to its parent in the key's tenant, and `ap-fail-parent-on-failure: true` makes a
failing child fail its running parent.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Infra
from tests.harness import Env, KeySpec, api_error, flow, running

TENANT = "tenant-a"
ECHO = [{"name": "echo", "action": "transform", "input": {"output": "{{ trigger }}"}}]
# A parent that stays RUNNING long enough for its children to end.
SLOW = [{"name": "wait", "action": "delay", "input": {"seconds": 30}}, {"name": "after", "action": "transform",
                                                                          "input": {"output": 1}}]  # fmt: skip
# A child that fails: its assertion is false.
FAILING = [{"name": "check", "action": "transform", "input": {"output": {"ok": False}},
            "assertions": [{"expression": "ok", "expected": True}]}]  # fmt: skip
FLOWS = [
    flow(TENANT, "echo", ECHO, trigger={"type": "manual"}),
    flow(TENANT, "slow", SLOW),
    flow(TENANT, "failing", FAILING),
    flow("tenant-b", "echo", ECHO),
]


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"a": KeySpec(TENANT, name="ada-console"), "ops": KeySpec(TENANT, name="ops"),
                                      "b": "tenant-b"}  # fmt: skip
    async with running(infra, tmp_path_factory, keys=keys, flows=FLOWS) as env:
        yield env


async def trigger(env: Env, flow_id: str, payload: object = None, key: str = "a", **headers: str) -> str:
    r = await env.ingest("POST", f"/v1/flows/{flow_id}/trigger", key, json={"input": payload}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["run_id"])


async def test_a_manual_trigger_records_manual_and_the_keys_id_and_cannot_name_another(env: Env) -> None:
    manual = await trigger(env, "echo", {"n": 1}, **{"X-Flowtrail-Trigger": "manual"})
    plain = await trigger(env, "echo", {"n": 2}, key="ops")
    by_ops = await trigger(env, "echo", {"n": 3}, key="ops", **{"X-Flowtrail-Trigger": "manual"})
    runs = {run_id: await env.wait_status(run_id, {"SUCCEEDED"}) for run_id in (manual, plain, by_ops)}
    assert (runs[manual]["trigger"]["type"], runs[manual]["trigger"]["caller"]) == ("manual", env.key_ids["a"])
    assert (runs[plain]["trigger"]["type"], runs[plain]["trigger"]["caller"]) == ("api", env.key_ids["ops"])
    assert (runs[by_ops]["trigger"]["type"], runs[by_ops]["trigger"]["caller"]) == ("manual", env.key_ids["ops"])
    listed = await env.api("GET", "/v1/runs", params={"trigger_type": "manual", "flow_id": "echo"})
    assert {r["id"] for r in listed.json()["data"]} >= {manual, by_ops}
    assert plain not in {r["id"] for r in listed.json()["data"]}
    mine = await env.api("GET", "/v1/runs", params={"trigger_type": "manual", "caller": env.key_ids["a"]})
    assert [r["id"] for r in mine.json()["data"]] == [manual]
    # The ledger keeps the key's name as it was: who started the run, even once the key is renamed or deleted.
    named = {run_id: (await env.events(run_id))[0]["payload"]["trigger"].get("caller_name")
             for run_id in (manual, plain, by_ops)}  # fmt: skip
    assert named == {manual: "ada-console", plain: None, by_ops: "ops"}
    # No other origin may be claimed, and none of this is possible without a key.
    for value in ("webhook", "schedule", "kafka"):
        r = await env.ingest("POST", "/v1/flows/echo/trigger", json={}, headers={"X-Flowtrail-Trigger": value})
        assert "X-Flowtrail-Trigger" in api_error(r, 422, "validation_error")
    r = await env.http.post(env.url("ingest") + "/v1/flows/echo/trigger", json={},
                            headers={"X-Flowtrail-Trigger": "manual"})  # fmt: skip
    api_error(r, 401, "unauthorized")


async def _run_cli(env: Env, *args: str) -> tuple[int, str, str]:
    """`flowtrail trigger ARGS` against the test stack with key `a`: exit status, stdout, stderr."""
    environ = {**os.environ, "FLOWTRAIL_API_KEY": env.keys["a"], "FLOWTRAIL_INGEST_URL": env.url("ingest"),
               "FLOWTRAIL_API_URL": env.url("api")}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("flowtrail")), "trigger", *args, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_triggers_a_manual_run_and_waits_for_its_end(env: Env, tmp_path: Path) -> None:
    code, out, err = await _run_cli(env, "echo", "--input", '{"from": "the cli"}', "--wait")
    assert code == 0, (out, err)
    run_id, status = out.splitlines()[0].split()
    assert run_id.startswith("run_") and status == "QUEUED"
    shown = json.loads(out.split("\n", 1)[1])
    assert shown["status"] == "SUCCEEDED" and shown["steps"][0]["output"] == {"from": "the cli"}
    assert shown["trigger"] == {"type": "manual", "caller": env.key_ids["a"], "payload": {"from": "the cli"}}
    run = await env.run(run_id)
    assert run is not None and run["trigger"]["type"] == "manual"

    # Without --wait it answers at once; an input from a file; a failed run exits 1.
    (tmp_path / "input.json").write_text('{"n": 5}')
    code, out, _ = await _run_cli(env, "echo", "--input", f"@{tmp_path / 'input.json'}")
    assert code == 0 and len(out.split()) == 2
    assert (await env.wait_status(out.split()[0], {"SUCCEEDED"}))["trigger"]["payload"] == {"n": 5}
    code, out, _ = await _run_cli(env, "failing", "--wait")
    assert code == 1 and json.loads(out.split("\n", 1)[1])["status"] == "FAILED"

    # Refusals are one line on stderr with exit status 2.
    for args, says in ((("nope",), "404 not_found"), (("echo", "--input", "{bad"), "--input is not JSON"),
                       (("echo", "--fail-parent-on-failure"), "needs --parent-run-id"),
                       (("echo", "--parent-run-id", "run_missing"), "404 not_found")):  # fmt: skip
        code, out, err = await _run_cli(env, *args)
        assert code == 2 and says in err and out == "", (args, code, out, err)


async def test_nested_headers_link_the_child_and_fail_a_running_parent_when_asked(env: Env) -> None:
    parent = await trigger(env, "slow")
    await env.wait_status(parent, {"RUNNING"})
    linked = await trigger(env, "echo", {"n": 1}, **{"ap-parent-run-id": parent})
    ok_child = await trigger(env, "echo", {"n": 2}, **{"ap-parent-run-id": parent, "ap-fail-parent-on-failure": "true"})
    lenient = await trigger(env, "failing", **{"ap-parent-run-id": parent, "ap-fail-parent-on-failure": "false"})
    for run_id, status in ((linked, "SUCCEEDED"), (ok_child, "SUCCEEDED"), (lenient, "FAILED")):
        child = await env.wait_status(run_id, {status})
        assert child["parent_run_id"] == parent, child
    await asyncio.sleep(1)
    assert (await env.run(parent) or {})["status"] == "RUNNING"  # a success, or a failure not passed on: no change

    failing = await trigger(env, "failing", **{"ap-parent-run-id": parent, "ap-fail-parent-on-failure": "true"})
    await env.wait_status(failing, {"FAILED"})
    ended = await env.wait_status(parent, {"FAILED"}, within=20)
    assert ended["error"]["code"] == "child_run_failed" and failing in ended["error"]["message"], ended["error"]
    assert {s["name"]: s["status"] for s in ended["steps"]}["wait"] == "CANCELED"

    # A parent that already ended is left as it is.
    done = await trigger(env, "echo")
    await env.wait_status(done, {"SUCCEEDED"})
    late = await trigger(env, "failing", **{"ap-parent-run-id": done, "ap-fail-parent-on-failure": "true"})
    await env.wait_status(late, {"FAILED"})
    await asyncio.sleep(1)
    assert (await env.run(done) or {})["status"] == "SUCCEEDED"


async def test_a_parent_must_be_a_run_of_the_keys_tenant(env: Env) -> None:
    theirs = await trigger(env, "echo", key="b")
    for parent in ("run_does_not_exist", theirs):
        r = await env.ingest("POST", "/v1/flows/echo/trigger", json={}, headers={"ap-parent-run-id": parent})
        assert "ap-parent-run-id" in api_error(r, 404, "not_found")
    for headers in ({"ap-parent-run-id": "x" * 101}, {"ap-fail-parent-on-failure": "true"},
                    {"ap-parent-run-id": theirs, "ap-fail-parent-on-failure": "maybe"}):  # fmt: skip
        api_error(await env.ingest("POST", "/v1/flows/echo/trigger", json={}, headers=headers), 422, "validation_error")
    before = await env.api("GET", "/v1/runs", params={"flow_id": "echo", "limit": 100})
    assert all(r.get("parent_run_id") != theirs for r in before.json()["data"])
