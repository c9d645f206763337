"""The HTTP contract of the API and ingest (docs/api-contract.md), on real processes.

Deterministic checks first — bytes PostgreSQL or Kafka cannot take (NUL, lone surrogates, numbers beyond their
columns) answer 4xx envelopes, 401 comes before 400, rate-limit headers are on every authenticated answer,
unknown query parameters answer 422 naming them, the product documents' names are aliases — then schemathesis over each
service's /openapi.json: no 5xx, every answer inside its declared schema, no undocumented status code.

`make test` runs a bounded number of generated cases (FLOWTRAIL_FUZZ_CASES, default 300, plus the coverage phase);
`make fuzz` runs 20,000 and prints the figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import Env, KeySpec, append_ledger, keep_history_of, running, wait_sql
from tests.harness import api_error as _envelope

pytestmark = pytest.mark.e2e

TENANT = "tenant-contract"
# Generated cases beyond schemathesis's coverage phase (which adds ~2,600 boundary and bad-byte cases of its own):
# 300 keeps this file near a minute on two cores; `make fuzz` asks for 20,000.
CASES = int(os.environ.get("FLOWTRAIL_FUZZ_CASES", "300"))
# Where schemathesis's output, event stream and example database go: the test's own temporary directory, or
# FLOWTRAIL_CONTRACT_REPORTS (make fuzz keeps them in .state/contract/fuzz). One directory per run: two runs
# sharing one (a make test beside a make fuzz) would share Hypothesis's database too.
_REPORTS_DIR = os.environ.get("FLOWTRAIL_CONTRACT_REPORTS")
REPORTS = Path(_REPORTS_DIR).resolve() if _REPORTS_DIR else None
RUN_IDS = [f"run_contract_{i}" for i in range(4)]
FLOW_ID = "contract-flow"
FLOW = {
    "id": FLOW_ID,
    "name": "Contract flow",
    "trigger": {"type": "schedule", "interval_s": 3600},
    "tags": ["contract"],
    "steps": [{"name": "shape", "action": "transform", "input": {"value": {"ok": True}}}],
}


def _client(env: Env, service: str, key: str | None = "key") -> httpx.AsyncClient:
    """A client for one service with `key` (a name in env.keys or a plaintext key), or without one (None)."""
    return env.client(service, key) if key else httpx.AsyncClient(base_url=env.url(service), timeout=15)


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"key": TENANT, "reader": KeySpec(TENANT, scopes=["runs:read"])}
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api", "ingest"),
                       env=LOOPBACK_ONLY) as env:  # fmt: skip
        await keep_history_of(env, TENANT)
        await append_ledger(env.sandbox, [
            e
            for i, run_id in enumerate(RUN_IDS)
            for e in run_events(run_id, tenant_id=TENANT, flow_id=FLOW_ID, fail_at=1 if i % 2 else None)
        ])  # fmt: skip
        await env.create_flow(FLOW)
        db = await env.db()
        try:
            await wait_sql(db, "SELECT count(*) = $1 FROM runs", len(RUN_IDS))
            await wait_sql(db, "SELECT count(*) = 1 FROM flows")
        finally:
            await db.close()
        yield env


def _limited(r: httpx.Response) -> None:
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        assert name in r.headers, (r.status_code, r.url, dict(r.headers))


# ---------------------------------------------------------------- bytes that must not reach PostgreSQL or Kafka


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs/%00",
        "/v1/runs/%00/events",
        "/v1/runs?q=%00",
        "/v1/runs?flow_id=a%00b",
        "/api/public/data/order/%00",
        "/api/public/data/%00",
        "/v1/flows/%00",
        "/v1/flows?q=%00",
        "/v1/api-keys/%00",
        "/v1/webhooks/%00/deliveries",
        "/v1/alerts?flow_id=%00",
        "/v1/connectors/%00",
        "/v1/analytics/flows/%00",
    ],
)
async def test_a_nul_byte_in_a_path_or_query_answers_400(env: Env, path: str) -> None:
    assert "NUL" in await _refused(env, path, 400, "invalid_request")


async def test_a_nul_byte_without_a_key_answers_401_first(env: Env) -> None:
    async with _client(env, "api", None) as client:
        _envelope(await client.get("/v1/runs/%00"), 401, "unauthorized")
        _envelope(await client.post("/v1/runs/bulk/cancel", content=b"{not json"), 401, "unauthorized")
        _envelope(await client.post("/v1/runs/bulk/cancel", json={"ids": ["\x00"]}), 401, "unauthorized")
    async with _client(env, "ingest", None) as client:
        _envelope(await client.post("/v1/flows/%00/trigger", json={}), 401, "unauthorized")
    # A key or header holding NUL (httpx will not send one: a raw request) never reaches a query: 400 or 401.
    for header in (b"Authorization: Bearer ft_live_\x00abcdefghijklmnop", b"Last-Event-ID: 1\x00"):
        status = await _raw_get(
            env.url("api"), "/v1/runs/run_contract_0/stream", header + b"\r\nAuthorization: Bearer x"
        )
        assert status in (400, 401), status


async def _refused(env: Env, path: str, status: int, code: str) -> str:
    """GET `path` answers the error envelope with `status` and `code`, with the rate-limit headers; its message."""
    async with _client(env, "api") as client:
        r = await client.get(path)
    message = _envelope(r, status, code)
    _limited(r)
    return message


async def _all_ok(client: httpx.AsyncClient, *paths: str) -> None:
    """Every path answers 200."""
    for path in paths:
        r = await client.get(path)
        assert r.status_code == 200, (path, r.text)


async def _raw_get(base: str, path: str, header: bytes) -> int:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + header
                     + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/runs/bulk/cancel", b'{"ids": ["a\\u0000b"]}', 400),
        ("POST", "/v1/runs/bulk/archive", b'{"flow_id": "\\ud800"}', 400),
        ("POST", "/v1/runs/bulk/archive", b'{"flow_id": "x\\udc00"}', 400),
        ("POST", "/v1/runs/run_contract_0/resume/req", b'{"answer": "\\u0000"}', 400),
        ("POST", "/v1/runs/run_contract_0/resume/req", b'{"answer": 99999999999999999999}', 422),
        ("POST", "/v1/runs/run_contract_0/resume/req", b'{"answer": 1e999}', 422),
        ("POST", "/v1/runs/run_contract_0/resume/req", b'{"answer": NaN}', 422),
        ("POST", "/v1/flows", b'{"id": "x\\u0000", "name": "n", "steps": []}', 400),
        ("POST", "/v1/api-keys", b'{"name": "\\u0000", "scopes": ["admin"]}', 400),
        ("POST", "/v1/webhooks", b'{"url": "https://example.com/\\u0000", "events": ["run.failed"]}', 400),
        ("POST", "/v1/runs/bulk/cancel", b"{not json", 400),
    ],
)
async def test_bad_json_bodies_answer_4xx_with_rate_limit_headers(
    env: Env, method: str, path: str, body: bytes, status: int
) -> None:
    async with _client(env, "api") as client:
        r = await client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    _envelope(r, status)
    _limited(r)


async def test_an_escaped_backslash_and_surrogate_pairs_are_ordinary_text(env: Env) -> None:
    body = b'{"ids": ["a\\\\u0000b", "\\ud83d\\ude00"], "dry_run": true}'
    async with _client(env, "api") as client:
        r = await client.post("/v1/runs/bulk/cancel", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["matched"] == 0


async def test_ingest_refuses_the_same_bytes_through_the_shared_handlers(env: Env) -> None:
    async with _client(env, "ingest") as client:
        _envelope(await client.post("/v1/flows/%00/trigger", json={}), 400, "invalid_request")
        r = await client.post(
            f"/v1/flows/{FLOW['id']}/trigger",
            content=b'{"input": {"order": "\\u0000"}}',
            headers={"Content-Type": "application/json"},
        )
        _envelope(r, 400, "invalid_request")
        _limited(r)
        r = await client.post(
            f"/v1/flows/{FLOW['id']}/trigger",
            content=b'{"input": {"total": 123456789012345678901234}}',
            headers={"Content-Type": "application/json"},
        )
        _envelope(r, 422, "validation_error")
        r = await client.post(
            f"/v1/flows/{FLOW['id']}/trigger", content=b"{", headers={"Content-Type": "application/json"}
        )
        _envelope(r, 400, "invalid_request")
        _limited(r)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/flows/contract-flow/versions/99999999999999999999",
        "/v1/flows/contract-flow/versions/2147483648",
        "/v1/runs/run_contract_0?as_of=99999999999999999999",
        "/v1/runs/run_contract_0?as_of=%C2%B2",
        "/v1/runs/run_contract_0?as_of=9999-12-31T23:59:59-23:00",
        "/v1/runs/run_contract_0/events?after_seq=99999999999999999999",
        "/v1/runs/run_contract_0/logs?after_seq=9223372036854775808",
        "/v1/runs?limit=99999999999999999999",
        "/v1/runs?created_after=2026-01-01T00:00:00",
        "/v1/runs?from=1700000000",
        "/v1/analytics/flows/contract-flow?to=0001-01-01T00:00:00Z",
        "/api/public/data/order?updated_since=2026-01-01",
    ],
)
async def test_numbers_and_times_out_of_range_answer_422(env: Env, path: str) -> None:
    await _refused(env, path, 422, "validation_error")


async def test_timestamps_with_an_offset_are_one_rule_everywhere(env: Env) -> None:
    async with _client(env, "api") as client:
        await _all_ok(
            client,
            "/v1/runs?created_after=2000-01-01T00:00:00Z",
            "/v1/runs?created_after=2000-01-01T01:00:00%2B01:00",
            "/v1/analytics/flows/contract-flow?from=2000-01-01T00:00:00Z",
            "/api/public/data/order?updated_since=2000-01-01T00:00:00.5Z",
            "/v1/runs/run_contract_0?as_of=2999-01-01T00:00:00Z",
        )
        r = await client.post("/v1/runs/bulk/archive", json={"createdAfter": "2000-01-01T00:00:00", "dry_run": True})
        assert "RFC 3339" in _envelope(r, 422, "validation_error")


# ------------------------------------------- query parameters: unknown ones, the product documents' names


@pytest.mark.parametrize(
    "path",
    [
        "/v1/runs?flowid=x",
        "/v1/runs/run_contract_0?verbose=1",
        "/v1/runs/run_contract_0/events?after=1",
        "/v1/flows?flow_id=x",
        "/v1/analytics/failure-groups?status=x",
        "/api/public/data/order?filter=x",
        "/v1/api-keys?limit=1",
        "/v1/connectors?kind=http",
    ],
)
async def test_unknown_query_parameters_answer_422_naming_them(env: Env, path: str) -> None:
    name = path.split("?")[1].split("=")[0]
    assert repr(name) in await _refused(env, path, 422, "validation_error")


async def _ids(client: httpx.AsyncClient, query: str) -> list[str]:
    r = await client.get(f"/v1/runs?{query}")
    assert r.status_code == 200, (query, r.text)
    return sorted(run["id"] for run in r.json()["data"])


async def test_the_seeds_names_are_aliases(env: Env) -> None:
    failed = [RUN_IDS[1], RUN_IDS[3]]
    async with _client(env, "api") as client:
        assert await _ids(client, "flowId=contract-flow") == sorted(RUN_IDS)
        assert await _ids(client, "flowId=other") == []
        assert await _ids(client, "action_name=other") == []
        assert await _ids(client, "status[]=failed") == failed  # any case
        assert await _ids(client, "status=Failed&status=FAILED") == failed
        assert await _ids(client, "failedStepName=step1") == failed
        assert await _ids(client, f"ids[]={RUN_IDS[0]}&ids[]={RUN_IDS[1]}") == RUN_IDS[:2]
        assert await _ids(client, f"uid={RUN_IDS[2]}") == [RUN_IDS[2]]
        assert await _ids(client, "user_uid=key_1") == sorted(RUN_IDS)
        assert await _ids(client, "user_uid=key_2") == []
        assert await _ids(client, "createdBefore=2000-01-01T00:00:00Z") == []
        assert await _ids(client, "includeArchived=true&projectId=" + TENANT) == sorted(RUN_IDS)
        assert await _ids(client, "workspace_uid=" + TENANT) == sorted(RUN_IDS)
        for other in ("workspace_uid=tenant-a", "projectId=tenant-b"):
            _envelope(await client.get(f"/v1/runs?{other}"), 403, "forbidden")
        r = await client.post(
            "/v1/runs/bulk/archive",
            json={"flowId": "contract-flow", "status": "Failed", "failedStepName": "step1", "dry_run": True},
        )
        assert r.status_code == 200, r.text
        assert r.json()["matched"] == 2
        r = await client.post("/v1/runs/bulk/retry", json={"uid": RUN_IDS[1], "dryRun": True})
        assert r.status_code == 200 and r.json()["matched"] == 1, r.text
        r = await client.post("/v1/runs/bulk/cancel", json={"action_name": "x", "workspace_uid": "tenant-a"})
        _envelope(r, 403, "forbidden")
        r = await client.post("/v1/runs/bulk/cancel", json={"flowId": "x", "flow_id": "y"})
        _envelope(r, 422, "validation_error")


async def test_scope_and_key_errors_come_before_input_errors(env: Env) -> None:
    async with _client(env, "api", "reader") as client:
        r = await client.post("/v1/runs/bulk/cancel", content=b'{"ids": ["\\u0000"]}')
        _envelope(r, 403, "forbidden")
        _limited(r)
    async with _client(env, "api", "ft_live_" + "x" * 43) as client:
        _envelope(await client.get("/v1/runs?nope=1"), 401, "unauthorized")


# ---------------------------------------------------------------- the OpenAPI documents and schemathesis


async def test_every_operation_declares_its_answers(env: Env) -> None:
    for service in ("api", "ingest"):
        async with _client(env, service, None) as client:
            schema = (await client.get("/openapi.json")).json()
        bearer = schema["components"]["securitySchemes"]["bearer"]
        assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
        for path, operations in schema["paths"].items():
            for method, op in operations.items():
                assert op.get("security") == [{"bearer": []}], (method, path)
                codes = set(op["responses"])
                assert {"400", "401", "403", "422", "429"} <= codes, (method, path, codes)
                for code, response in op["responses"].items():
                    content = response.get("content", {})
                    if code.startswith(("4", "5")):
                        ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                        envelope = schema["components"]["schemas"][ref]
                        assert envelope["required"] == ["error"], (method, path, code, ref)
                    elif service == "api" and code != "204":
                        # A declared model (a $ref), or for the streams the shape of one event.
                        ((media, body),) = content.items()
                        declared = body.get("schema") or body.get("itemSchema")
                        assert declared and ("$ref" in declared or media == "text/event-stream"), (method, path, code)
    # Closed objects, except the caller's free-form data (docs/api-contract.md).
    async with _client(env, "api", None) as client:
        models = (await client.get("/openapi.json")).json()["components"]["schemas"]
    open_models = sorted(name for name, model in models.items() if model.get("additionalProperties") is True)
    assert open_models == ["CanonicalRecord"], open_models


# The fuzzer registers webhooks, connectors and alert channels with generated URLs: nothing may leave the machine.
# Registration then skips resolving their hosts (no DNS), and the projector never gets round to sending.
LOOPBACK_ONLY = {
    "FLOWTRAIL_API_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    "FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true",
    "FLOWTRAIL_PROJECTOR_WEBHOOK_POLL_S": "1000000",
    "FLOWTRAIL_PROJECTOR_ALERT_POLL_S": "1000000",
    "FLOWTRAIL_PROJECTOR_ALERT_CLOCK_S": "1000000",
}
# Not fuzzed: the live feeds, which do not end while runs go on (tests/integration/test_streams.py and the test
# above cover them), the operations that would end the fuzzer's own key (its id
# is in GET /v1/api-keys, which schemathesis reads ids from; tests/integration/test_api_keys.py covers them), and
# verify, which connects to the connector's address (tests/integration/test_connectors.py covers it).
EXCLUDED = (
    "GET /v1/stream",
    "GET /v1/runs/{run_id}/stream",  # follows a run that has not ended until it does (or the client leaves)
    "POST /v1/api-keys/{key_id}/revoke",
    "POST /v1/api-keys/{key_id}/rotate",
    "DELETE /v1/api-keys/{key_id}",
    "POST /v1/connectors/{connector_id}/verify",  # connects to the connector's (generated) address
)


def _schemathesis(base: str, key: str, cases: int, operations: int, report: Path) -> list[str]:
    # Hypothesis stops early on operations whose inputs it has exhausted (no parameters, a closed enum), so the
    # others are asked for a quarter more to reach `cases` in total.
    per_operation = max(1, math.ceil(cases * 1.25 / max(1, operations)))
    return [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base}/openapi.json",
        "--url", base,
        "--header", f"Authorization: Bearer {key}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance,response_headers_conformance",
        "--phases", "examples,coverage,fuzzing",
        "--mode", "all",
        "--max-examples", str(per_operation),
        *(arg for name in EXCLUDED for arg in ("--exclude-name", name)),
        "--request-timeout", "15",
        # One worker: Python 3.11's ast.parse is not thread-safe (python/cpython#106905), and Hypothesis parses
        # strategies' lambdas to describe them, so two workers fail now and then with "AST constructor recursion
        # depth mismatch" (a Runtime Error of the run, not of the API).
        "--workers", "1",
        "--seed", os.environ.get("FLOWTRAIL_FUZZ_SEED", "20261206"),
        "--no-shrink",
        "--continue-on-failure",
        "--report", "ndjson",
        "--report-ndjson-path", str(report),
        "--output-truncate", "true",
    ]  # fmt: skip


def _figures(report: Path) -> dict[str, Any]:
    """Cases sent, 5xx answers and failures by check, from schemathesis's event stream."""
    cases = server_errors = 0
    failures: dict[str, int] = {}
    for line in report.read_text().splitlines():
        try:
            data = json.loads(line).get("ScenarioFinished")
        except ValueError:  # a line cut short (the run was stopped)
            continue
        if not data:
            continue
        recorder = data.get("recorder") or {}
        for interaction in recorder.get("interactions", {}).values():
            cases += 1
            status = (interaction.get("response") or {}).get("status_code") or 0
            server_errors += status >= 500
        for check in recorder.get("checks", {}).values():
            for result in check:
                if result.get("status") == "FAILURE":
                    failures[result["name"]] = failures.get(result["name"], 0) + 1
    return {"cases": cases, "server_errors": server_errors, "failures": failures}


async def test_schemathesis_finds_no_5xx_no_undocumented_status_and_no_schema_breach(env: Env) -> None:
    summary = {}
    for name in ("api", "ingest"):
        base = env.url(name)
        async with _client(env, name, None) as client:
            schema = (await client.get("/openapi.json")).json()
        assert all(s["url"].startswith("http://127.0.0.1") for s in schema.get("servers", [])), schema.get("servers")
        operations = sum(
            f"{method.upper()} {path}" not in EXCLUDED for path, ops in schema["paths"].items() for method in ops
        )
        # Each service's share of the cases, by its number of operations.
        cases = CASES if name == "api" else max(50, CASES // 20)
        reports = REPORTS or env.stack.log_dir
        reports.mkdir(parents=True, exist_ok=True)
        report = reports / f"schemathesis-{name}.ndjson"
        process = await asyncio.create_subprocess_exec(
            *_schemathesis(base, env.key, cases, operations, report),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=reports,  # schemathesis keeps its example database (.hypothesis/) in the working directory
        )
        output, _ = await process.communicate()
        text = output.decode(errors="replace")
        (reports / f"schemathesis-{name}.txt").write_text(text)
        figures = _figures(report) if report.exists() else {}
        summary[name] = figures
        print(f"\nschemathesis {name}: {figures}\n{text[-1500:]}")
        assert process.returncode == 0, f"schemathesis found problems in {name} ({figures}):\n{text[-6000:]}"
    print("contract figures:", json.dumps(summary))


async def test_a_finished_runs_stream_resumed_past_its_end_closes_at_once(env: Env) -> None:
    async with _client(env, "api") as client:
        for query in ("after_seq=1000", "after_seq=2"):
            started = time.monotonic()
            r = await client.get(f"/v1/runs/{RUN_IDS[0]}/stream?{query}")
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 3, (query, time.monotonic() - started, r.text[:300])


async def test_enumerations_are_accepted_in_any_case(env: Env) -> None:
    async with _client(env, "api") as client:
        await _all_ok(
            client,
            "/v1/runs?status=Succeeded&trigger_type=API&execution_mode=Async",
            "/v1/runs/run_contract_1/logs?level=error",
            "/v1/flows?status=ACTIVE&trigger_type=Schedule",
            "/v1/alerts?status=OPEN",
            "/v1/connectors?status=Degraded",
            "/v1/analytics/failure-groups?category=validation",
        )
        _envelope(await client.get("/v1/alerts?status=closed"), 422, "validation_error")
