"""`flowtrail demo`: fires triggers at the demo flows and shows the runs reaching their final status."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from typing import Any

import httpx

from deploy.launcher.demo_flows import API_TEST, APPROVAL, ORDER_SYNC, WEBHOOK, demo_inputs
from deploy.launcher.demo_upstream import DEMO_UPSTREAM_PORT, DemoUpstream, serve
from schemas.status import TERMINAL_RUN_STATUSES
from services.common.settings import DEFAULT_API_PORT, DEFAULT_INGEST_PORT, CommonSettings

TERMINAL = {s.value for s in TERMINAL_RUN_STATUSES}
PLAN = {"demo-order-sync": 5, "demo-invoice-push": 2, ORDER_SYNC: 1, API_TEST: 1, APPROVAL: 1}
ANSWER = {"approved": True, "carrier": "DHL", "by": "flowtrail demo"}
# The shop's own order-created event, posted raw (no {"input": …} envelope, no key) to the flow's hook URL, twice.
SHOP_EVENT = {"id": 820982911946154508, "name": "#1050", "email": "jon@example.com", "total_price": "199.00"}


class DemoError(RuntimeError):
    pass


async def _trigger(client: httpx.AsyncClient, url: str, key: str, flow_id: str, payload: Any, deadline: float) -> str:
    # Right after `up`, the projector may not have projected the demo flows yet: 404 is retried briefly.
    while True:
        r = await client.post(
            f"{url}/v1/flows/{flow_id}/trigger", json={"input": payload}, headers={"Authorization": f"Bearer {key}"}
        )
        if r.status_code == 202:
            return str(r.json()["run_id"])
        if r.status_code != 404 or time.monotonic() > deadline:
            raise DemoError(f"trigger {flow_id} answered {r.status_code}: {r.text}")
        await asyncio.sleep(0.2)


async def _act(
    client: httpx.AsyncClient,
    api_url: str,
    headers: dict[str, str],
    run: dict[str, Any],
    upstream: DemoUpstream,
    out: Any,
) -> str | None:
    """What a person would do next: answer a paused approval, or fix the refused order in the shop and retry the
    PARTIAL sync (only that order is sent again). Returns the retry's run id."""
    run_id = run["id"]
    if run["status"] == "PAUSED" and run.get("waiting_for"):
        request_id = run["waiting_for"]["request_id"]
        r = await client.post(f"{api_url}/v1/runs/{run_id}/resume/{request_id}", json=ANSWER, headers=headers)
        if r.status_code != 202:
            raise DemoError(f"resume {run_id} answered {r.status_code}: {r.text}")
        print(f"{run_id} asked {run['waiting_for']['prompt'].get('question')!r}; answered {ANSWER}", file=out)
    elif run["status"] == "PARTIAL" and run["flow_id"] == ORDER_SYNC:
        upstream.fix_refused_order()
        r = await client.post(f"{api_url}/v1/runs/{run_id}/retry", json={"strategy": "FROM_FAILED_STEP"},
                              headers=headers)  # fmt: skip
        if r.status_code != 202:
            raise DemoError(f"retry {run_id} answered {r.status_code}: {r.text}")
        print(f"{run_id} ended PARTIAL ({run['records']}); fixed the order in the shop and retried it as "
              f"{r.json()['run_id']}", file=out)  # fmt: skip
        return str(r.json()["run_id"])
    return None


async def _deliver_webhook(client: httpx.AsyncClient, ingest_url: str, key: str, deadline: float) -> str:
    """The shop's webhook delivery, and its redelivery: one run (the event's id names it)."""
    headers = {"Authorization": f"Bearer {key}"}
    while True:  # as for a trigger: the flow may not be projected yet right after `up`
        r = await client.get(f"{ingest_url}/v1/flows/{WEBHOOK}/hook", headers=headers)
        if r.status_code == 200 and r.json().get("url"):
            break
        if r.status_code != 404 or time.monotonic() > deadline:
            raise DemoError(f"GET /v1/flows/{WEBHOOK}/hook answered {r.status_code}: {r.text}")
        await asyncio.sleep(0.2)
    runs = set()
    for _ in range(2):
        delivery = await client.post(r.json()["url"], json=SHOP_EVENT)
        if delivery.status_code != 202:
            raise DemoError(f"webhook delivery answered {delivery.status_code}: {delivery.text}")
        runs.add(str(delivery.json()["run_id"]))
    if len(runs) != 1:
        raise DemoError(f"a redelivered webhook made another run: {sorted(runs)}")
    return runs.pop()


async def _diagnose(client: httpx.AsyncClient, api_url: str, headers: dict[str, str], run_id: str) -> str:
    """One line: what GET /v1/runs/{id}/diagnosis says of a failed run."""
    r = await client.get(f"{api_url}/v1/runs/{run_id}/diagnosis", headers=headers)
    if r.status_code != 200:
        raise DemoError(f"GET /v1/runs/{run_id}/diagnosis answered {r.status_code}: {r.text}")
    found = r.json().get("diagnosis")
    if not found:
        return f"{run_id}: {r.json()['message']}"
    return f"{run_id}: root cause {found['root_cause']}; next: {found['next_action']}"


def _progress(runs: dict[str, dict[str, Any]], started: float) -> str:
    done = sum(1 for r in runs.values() if r.get("status") in TERMINAL)
    counts = Counter(r.get("status", "QUEUED") for r in runs.values())
    width = 24
    bar = "#" * (width * done // max(1, len(runs)))
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return f"[{bar:<{width}}] {done}/{len(runs)} final  ({summary})  {time.monotonic() - started:4.1f}s"


async def run_demo(
    settings: CommonSettings,
    api_key: str,
    *,
    api_url: str = f"http://127.0.0.1:{DEFAULT_API_PORT}",
    ingest_url: str = f"http://127.0.0.1:{DEFAULT_INGEST_PORT}",
    timeout_s: float = 60.0,
    out: Any = None,
    upstream_port: int = DEMO_UPSTREAM_PORT,
) -> dict[str, dict[str, Any]]:
    """Returns each demo run as the API shows it at the end, keyed by run id.

    The seed flows' upstream (a shop, an ERP, a users API, a warehouse) is served on loopback while this runs.
    """
    out = out or sys.stdout
    upstream = DemoUpstream.seeded()
    try:
        runner = await serve(upstream, upstream_port)
    except OSError as exc:
        raise DemoError(f"cannot serve the demo upstream on 127.0.0.1:{upstream_port}: {exc}") from exc
    try:
        return await _run_demo(api_key, api_url, ingest_url, timeout_s, out, upstream)
    finally:
        await runner.cleanup()


async def _run_demo(api_key: str, api_url: str, ingest_url: str, timeout_s: float, out: Any,
                    upstream: DemoUpstream) -> dict[str, dict[str, Any]]:  # fmt: skip
    tty = hasattr(out, "isatty") and out.isatty()
    started = time.monotonic()
    deadline = started + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=10) as client:
        flow_of: dict[str, str] = {}
        for flow_id, n in PLAN.items():
            for payload in demo_inputs(flow_id, n):
                flow_of[await _trigger(client, ingest_url, api_key, flow_id, payload, deadline)] = flow_id
        print(f"fired {len(flow_of)} triggers: " + ", ".join(f"{n} x {f}" for f, n in PLAN.items()), file=out)
        hooked = await _deliver_webhook(client, ingest_url, api_key, deadline)
        flow_of[hooked] = f"{WEBHOOK} (webhook)"
        print(f"the shop delivered its order-created event twice to the {WEBHOOK} hook URL: one run, {hooked}",
              file=out)  # fmt: skip
        runs: dict[str, dict[str, Any]] = {run_id: {} for run_id in flow_of}
        last_line = ""
        handled: set[tuple[str, str]] = set()  # (run, status): a paused run is answered once, not at every poll
        while True:
            for run_id, run in list(runs.items()):
                if run.get("status") in TERMINAL:
                    continue
                r = await client.get(f"{api_url}/v1/runs/{run_id}", headers=headers)
                if r.status_code == 200:
                    runs[run_id] = run = r.json()
                    if (run_id, run["status"]) not in handled:
                        handled.add((run_id, run["status"]))
                        if retry_id := await _act(client, api_url, headers, run, upstream, out):
                            runs[retry_id], flow_of[retry_id] = {}, f"{flow_of[run_id]} (retry)"
                elif r.status_code == 429:  # over the key's read limit (docs/api-contract.md): wait as told
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                elif r.status_code != 404:  # 404: not projected yet
                    raise DemoError(f"GET /v1/runs/{run_id} answered {r.status_code}: {r.text}")
            line = _progress(runs, started)
            if tty:
                print("\r" + line, end="", file=out, flush=True)
            elif line.split("  ")[0] != last_line.split("  ")[0]:
                print(line, file=out, flush=True)
            last_line = line
            if all(r.get("status") in TERMINAL for r in runs.values()):
                break
            if time.monotonic() > deadline:
                raise DemoError(f"demo runs not final after {timeout_s:.0f}s: {line}")
            await asyncio.sleep(0.2)
    if tty:
        print(file=out)
    print(f"\n{'run':<34} {'flow':<36} {'status':<10} {'ms':>7}  failed step / error", file=out)
    for run_id, run in runs.items():
        why = f"{run.get('failed_step')}: {run.get('error_message')}" if run.get("failed_step") else ""
        why = why or run.get("error_message") or ""  # a PARTIAL run says how many records failed
        duration = run.get("duration_ms") or 0
        print(f"{run_id:<34} {flow_of[run_id]:<36} {run['status']:<10} {duration:>7.0f}  {why}", file=out)
    failed = [run_id for run_id, run in runs.items() if run["status"] == "FAILED"]
    if failed:
        async with httpx.AsyncClient(timeout=10) as client:
            print(f"\ndiagnosis of {await _diagnose(client, api_url, headers, failed[0])}", file=out)
    print(f"\nsee one: curl -H 'Authorization: Bearer {api_key}' {api_url}/v1/runs/{next(iter(runs))}", file=out)
    print(f"synced orders: curl -H 'Authorization: Bearer {api_key}' {api_url}/api/public/data/order", file=out)
    return runs
