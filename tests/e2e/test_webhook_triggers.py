"""Webhook triggers on the real stack (docs/intake.md#webhook-triggers): an upstream posts its own delivery, with no
Flowtrail key, to the URL `GET /v1/flows/{id}/hook` gives; every signature scheme accepts a good delivery and refuses
a missing, bad, stale or wrongly keyed one; every kind of body becomes the run input or a clear 4xx; a redelivery is
the same run; the run records trigger type `webhook` and the request's headers with credentials masked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from schemas.flows import TriggerConfig
from services.ingest.webhooks import sign
from tests.conftest import Infra
from tests.harness import Env, KeySpec, api_error, connected, flow, publish_flows, running

TENANT = "tenant-a"
ECHO = [{"name": "echo", "action": "transform", "input": {"output": "{{ trigger }}"}}]
GH_SECRET = "gh-secret-5f1d2c9a7e"
SIG_SECRET = "sig-secret-b81c44e0d2"
SCHEMES: dict[str, dict[str, Any]] = {
    "hook-hex": {"signature_header": "X-Hub-Signature-256", "secret_name": "gh", "delivery_id_header":
                 "X-GitHub-Delivery"},
    "hook-b64": {"signature_header": "X-Signature", "secret_name": "sig", "signature_scheme": "hmac-sha256-base64"},
    "hook-stripe": {"signature_header": "Stripe-Signature", "secret_name": "sig", "signed_content": "t.body",
                    "tolerance_s": 300, "delivery_id_path": "id"},
    "hook-stripe-b64": {"signature_header": "Stripe-Signature", "secret_name": "gh", "signed_content": "t.body",
                        "signature_scheme": "hmac-sha256-base64"},
}  # fmt: skip
SECRETS = {"gh": GH_SECRET, "sig": SIG_SECRET}
FLOWS = [
    flow(TENANT, "hook-plain", ECHO, trigger={"type": "webhook"}),
    flow(TENANT, "hook-missing-secret", ECHO, trigger={"type": "webhook", "signature_header": "X-Sig",
                                                       "secret_name": "never_stored"}),
    flow(TENANT, "api-flow", ECHO, trigger={"type": "api"}),
    flow(TENANT, "hook-paused", ECHO, trigger={"type": "webhook"}),
    flow(TENANT, "hook-rotate", ECHO, trigger={"type": "webhook"}),
    *(flow(TENANT, name, ECHO, trigger={"type": "webhook", **options}) for name, options in SCHEMES.items()),
]  # fmt: skip
MAX_INPUT = 4096


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"a": KeySpec(TENANT, name="ops"), "b": "tenant-b"}
    async with running(infra, tmp_path_factory, keys=keys, flows=FLOWS,
                       env={"FLOWTRAIL_INGEST_MAX_INPUT_BYTES": str(MAX_INPUT)}) as env:  # fmt: skip
        for name, value in SECRETS.items():
            await env.ok("PUT", f"/v1/secrets/{name}", json={"value": value}, status=201)
        await env.ok("POST", "/v1/flows/hook-paused/pause")
        yield env


async def hook_url(env: Env, flow_id: str, key: str = "a") -> str:
    r = await env.ingest("GET", f"/v1/flows/{flow_id}/hook", key)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["url"].startswith(env.url("ingest") + f"/v1/hooks/{flow_id}/"), answer
    return str(answer["url"])


async def deliver(env: Env, url: str, body: bytes, **headers: str) -> httpx.Response:
    """A delivery as an upstream makes it: no Authorization, its own headers."""
    return await env.http.post(url, content=body, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def runs_of(env: Env, flow_id: str) -> list[dict[str, Any]]:
    r = await env.api("GET", "/v1/runs", params={"flow_id": flow_id, "limit": 100})
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def signed(flow_id: str, body: bytes, secret: str | None = None, at: int | None = None) -> dict[str, str]:
    options = SCHEMES[flow_id]
    config = TriggerConfig.model_validate({"type": "webhook", **options})
    stamp = (int(time.time()) if at is None else at) if config.signed_content == "t.body" else None
    value = sign(config, body, secret or SECRETS[str(options["secret_name"])], stamp)
    return {str(options["signature_header"]): value, "Content-Type": "application/json"}


@pytest.mark.parametrize("flow_id", sorted(SCHEMES))
async def test_every_scheme_takes_a_good_delivery_and_refuses_missing_bad_stale_and_wrong_secret(
    env: Env, flow_id: str
) -> None:
    url = await hook_url(env, flow_id)
    body = orjson.dumps({"id": f"evt_{flow_id}", "amount": 12})
    header = str(SCHEMES[flow_id]["signature_header"])
    good = signed(flow_id, body)
    refusals = {
        "missing": ({"Content-Type": "application/json"}, "signature_missing"),
        "bad": ({**good, header: good[header][:-4] + "abcd"}, None),
        "wrong secret": (signed(flow_id, body, secret="not-the-secret"), "signature_invalid"),
        "another body": (signed(flow_id, body + b" "), "signature_invalid"),
    }
    if SCHEMES[flow_id].get("signed_content") == "t.body":
        refusals["stale"] = (signed(flow_id, body, at=int(time.time()) - 301), "signature_expired")
        refusals["malformed"] = ({header: "v1=abc", "Content-Type": "application/json"}, "signature_malformed")
    for what, (headers, code) in refusals.items():
        r = await env.http.post(url, content=body, headers=headers)
        message = api_error(r, 401, code)
        assert header in message or "signature" in message, (what, message)
    r = await env.http.post(url, content=body, headers=good)
    assert r.status_code == 202, r.text
    assert r.json()["redelivery"] is False and r.json()["status"] == "QUEUED"
    run = await env.wait_status(r.json()["run_id"], {"SUCCEEDED"})
    assert run["trigger"]["type"] == "webhook"
    assert run["trigger"]["payload"] == {"id": f"evt_{flow_id}", "amount": 12}
    assert run["steps"][0]["output"] == {"id": f"evt_{flow_id}", "amount": 12}
    assert [x["id"] for x in await runs_of(env, flow_id)] == [run["id"]]  # the refused ones made no run


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/json", b'{"order": {"id": 7, "lines": [1, 2]}}', {"order": {"id": 7, "lines": [1, 2]}}),
        ("application/x-www-form-urlencoded", b"name=Ada+L&tag=a&tag=b&city=Z%C3%BCrich",
         {"name": "Ada L", "tag": ["a", "b"], "city": "Zürich"}),
        ("text/plain; charset=utf-8", "héllo\nwörld".encode(), {"text": "héllo\nwörld"}),
        ("application/xml", b"<order id='7'/>", {"text": "<order id='7'/>"}),
        ("application/json", b"", None),
        (None, b"", None),
    ],
    ids=["json", "form", "text", "xml-as-text", "empty-json", "empty"],
)  # fmt: skip
async def test_every_kind_of_body_is_the_run_input(
    env: Env, content_type: str | None, body: bytes, expected: Any
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await env.http.post(await hook_url(env, "hook-plain"), content=body, headers=headers)
    assert r.status_code == 202, r.text
    run = await env.wait_status(r.json()["run_id"], {"SUCCEEDED"})
    assert run["trigger"]["type"] == "webhook" and run["trigger"]["payload"] == expected


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("application/json", b'{"a": "x\\u0000y"}', 400, "invalid_request"),
        ("application/json", b'{"a": "\\ud800"}', 400, "invalid_request"),
        ("application/json", b'{"a": 1', 400, "invalid_body"),
        ("application/json", b'{"a": "\xff"}', 400, "invalid_body"),
        ("application/json", b'{"n": 1' + b"0" * 30 + b"}", 422, "validation_error"),
        ("text/plain", b"nul\x00byte", 400, "invalid_body"),
        ("text/plain", b"caf\xe9", 400, "invalid_body"),
        ("text/plain", b"\xed\xa0\x80", 400, "invalid_body"),
        ("application/x-www-form-urlencoded", b"a=%00", 400, "invalid_body"),
        ("application/x-www-form-urlencoded", b"a=%ff%fe", 400, "invalid_body"),
        ("application/octet-stream", b"\x00\x01", 415, "unsupported_media_type"),
        ("application/json", b'{"pad": "' + b"x" * MAX_INPUT + b'"}', 413, "payload_too_large"),
        ("text/plain", b"x" * (MAX_INPUT - 5), 413, "payload_too_large"),  # the input {"text": …} is larger
    ],
    ids=["json-nul-escape", "json-lone-surrogate", "json-malformed", "json-not-utf8", "json-huge-number",
         "text-nul", "text-latin1", "text-surrogate", "form-nul", "form-not-utf8", "binary", "oversize",
         "oversize-as-input"],
)  # fmt: skip
async def test_bodies_that_cannot_be_an_input_are_refused_and_make_no_run(
    env: Env, content_type: str, body: bytes, status: int, code: str
) -> None:
    before = len(await runs_of(env, "hook-plain"))
    r = await env.http.post(await hook_url(env, "hook-plain"), content=body, headers={"Content-Type": content_type})
    api_error(r, status, code)
    await asyncio.sleep(0.3)
    assert len(await runs_of(env, "hook-plain")) == before


async def test_a_redelivery_is_the_same_run_even_when_resigned_or_concurrent(env: Env) -> None:
    url = await hook_url(env, "hook-hex")
    body = b'{"action": "opened", "number": 42}'
    first = await env.http.post(url, content=body, headers={**signed("hook-hex", body), "X-GitHub-Delivery": "d-42"})
    assert first.status_code == 202 and first.json()["redelivery"] is False, first.text
    run_id = first.json()["run_id"]
    await env.wait_status(run_id, {"SUCCEEDED"})
    again = await env.http.post(url, content=body, headers={**signed("hook-hex", body), "X-GitHub-Delivery": "d-42"})
    assert again.status_code == 202 and again.json() == {"run_id": run_id, "status": "QUEUED", "redelivery": True}
    # Ten copies of a new delivery at once (an upstream retrying on a timeout): one run.
    answers = await asyncio.gather(*(
        env.http.post(url, content=body, headers={**signed("hook-hex", body), "X-GitHub-Delivery": "d-43"})
        for _ in range(10)
    ))  # fmt: skip
    assert {a.status_code for a in answers} == {202}
    (other,) = {a.json()["run_id"] for a in answers}
    assert other != run_id
    await env.wait_status(other, {"SUCCEEDED"})
    runs = [r for r in await runs_of(env, "hook-hex") if r["id"] in (run_id, other)]
    assert len(runs) == 2
    async with connected(env) as conn:
        requested = await conn.fetchval(
            "SELECT count(*) FROM run_events WHERE run_id = $1 AND type = 'RunRequested'", other
        )
    assert requested == 1
    # Stripe sends no delivery header; its retries carry the same event (`delivery_id_path: id`), signed anew.
    url = await hook_url(env, "hook-stripe")
    event = b'{"id": "evt_retried", "type": "invoice.paid"}'
    first = await env.http.post(url, content=event, headers=signed("hook-stripe", event, at=int(time.time()) - 60))
    retry = await env.http.post(url, content=event, headers=signed("hook-stripe", event))
    assert first.status_code == retry.status_code == 202, (first.text, retry.text)
    assert retry.json()["run_id"] == first.json()["run_id"]
    # Another flow's delivery with the same id is its own run.
    plain = await deliver(env, await hook_url(env, "hook-plain"), b"{}", Idempotency_Key="d-43",
                          Content_Type="application/json")  # fmt: skip
    assert plain.status_code == 202 and plain.json()["run_id"] not in (run_id, other)


async def test_the_run_records_the_headers_with_credentials_and_signatures_masked(env: Env) -> None:
    body = b'{"ref": "main"}'
    headers = {**signed("hook-hex", body), "X-GitHub-Delivery": "d-masked", "X-GitHub-Event": "push",
               "Authorization": "Basic dXNlcjpzM2NyZXQ=", "X-Api-Key": "upstream-key-991", "Cookie": "sid=c00kie-77",
               "User-Agent": "GitHub-Hookshot/abc"}  # fmt: skip
    r = await env.http.post(await hook_url(env, "hook-hex"), content=body, headers=headers)
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    await env.wait_status(run_id, {"SUCCEEDED"})
    events = await env.events(run_id)
    recorded = events[0]["payload"]["trigger"]["headers"]
    assert recorded["x-github-event"] == "push" and recorded["user-agent"] == "GitHub-Hookshot/abc"
    assert recorded["x-github-delivery"] == "d-masked" and recorded["content-type"] == "application/json"
    for name in ("authorization", "x-api-key", "cookie", "x-hub-signature-256"):
        assert recorded[name] == "***", (name, recorded)
    stored = orjson.dumps([events, await env.run(run_id)]).decode()
    for plaintext in ("dXNlcjpzM2NyZXQ=", "upstream-key-991", "c00kie-77", headers["X-Hub-Signature-256"],
                      GH_SECRET):  # fmt: skip
        assert plaintext not in stored


async def test_webhook_runs_are_filtered_by_trigger_type_and_api_calls_stay_api(env: Env) -> None:
    r = await env.http.post(await hook_url(env, "hook-plain"), content=b'{"via": "hook"}',
                            headers={"Content-Type": "application/json"})  # fmt: skip
    hooked = r.json()["run_id"]
    called = await env.trigger("hook-plain", {"via": "api"})
    for run_id in (hooked, called):
        await env.wait_status(run_id, {"SUCCEEDED"})
    webhook = await env.api("GET", "/v1/runs", params={"trigger_type": "webhook", "flow_id": "hook-plain",
                                                        "limit": 100})  # fmt: skip
    ids = {x["id"] for x in webhook.json()["data"]}
    assert hooked in ids and called not in ids
    assert {x["trigger_type"] for x in webhook.json()["data"]} == {"webhook"}
    api = await env.api("GET", "/v1/runs", params={"trigger_type": "api", "flow_id": "hook-plain"})
    assert [x["id"] for x in api.json()["data"]] == [called]
    detail = await env.run(called)
    assert detail is not None and detail["trigger"]["caller"] == env.key_ids["a"]


async def test_urls_that_name_no_webhook_are_404_and_a_paused_flow_409(env: Env) -> None:
    url = await hook_url(env, "hook-plain")
    token = url.rsplit("/", 1)[1]
    base = env.url("ingest") + "/v1/hooks"
    for wrong in (f"{base}/hook-plain/{token[:-3]}xyz", f"{base}/hook-plain/nope", f"{base}/hook-hex/{token}",
                  f"{base}/hook-plain/{token}%00"):  # fmt: skip
        r = await env.http.post(wrong, content=b"{}", headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 404), (wrong, r.text)
    api_error(await env.http.post(f"{base}/hook-plain/nope", content=b"{}"), 404, "not_found")
    # A second URL issued works as well; another tenant's key cannot get one.
    second = await deliver(env, await hook_url(env, "hook-plain"), b"{}", Content_Type="application/json")
    assert second.status_code == 202
    api_error(await env.ingest("GET", "/v1/flows/hook-plain/hook", "b"), 404, "not_found")
    other = await env.ingest("GET", "/v1/flows/api-flow/hook")
    assert other.status_code == 200 and other.json()["trigger_type"] == "api" and other.json()["url"] is None
    paused = await hook_url(env, "hook-paused")
    api_error(await deliver(env, paused, b"{}", Content_Type="application/json"), 409, "conflict")


async def test_a_signing_secret_not_stored_is_503_until_it_is(env: Env) -> None:
    url = await hook_url(env, "hook-missing-secret")
    r = await deliver(env, url, b"{}", X_Sig="00", Content_Type="application/json")
    assert "never_stored" in api_error(r, 503, "secret_not_found") and r.headers["retry-after"]


async def test_raising_the_url_generation_retires_old_urls(env: Env) -> None:
    old = await hook_url(env, "hook-rotate")
    assert (await deliver(env, old, b"{}", Content_Type="application/json")).status_code == 202
    republished = flow(TENANT, "hook-rotate", ECHO, trigger={"type": "webhook", "url_generation": 2})
    await publish_flows(env.sandbox, [republished.model_copy(update={"version": 2})])  # a version: no new flow

    async def retired() -> bool:
        r = await deliver(env, old, b"{}", Content_Type="application/json")
        return r.status_code == 404

    deadline = time.monotonic() + 30
    while not await retired():
        assert time.monotonic() < deadline, "the old URL still works"
        await asyncio.sleep(0.2)
    new = await hook_url(env, "hook-rotate")
    assert (await deliver(env, new, b"{}", Content_Type="application/json")).status_code == 202
