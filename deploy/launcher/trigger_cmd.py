"""`flowtrail trigger FLOW --input JSON [--wait]`: one run of a flow, started by hand through ingest and recorded as
trigger type `manual` with the key's id as its caller (docs/intake.md#manual-triggers-and-nested-runs).

The key is FLOWTRAIL_API_KEY, or the one `flowtrail up` wrote in the state folder; ingest and the API are
FLOWTRAIL_INGEST_URL and FLOWTRAIL_API_URL, or the local stack's addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx

from deploy.launcher.errors import LauncherError
from deploy.launcher.stack import API_URL, INGEST_URL, StackPaths, read_api_key
from schemas.status import TERMINAL_RUN_STATUSES
from services.common.settings import CommonSettings

_TERMINAL = frozenset(s.value for s in TERMINAL_RUN_STATUSES)
_SUCCEEDED = frozenset({"SUCCEEDED", "PARTIAL"})


def add_parser(sub: Any) -> None:
    """The `trigger` subcommand, on the launcher's subparsers."""
    trigger = sub.add_parser("trigger", help="start one run of a flow by hand (trigger type manual)")
    trigger.add_argument("flow", metavar="FLOW", help="the flow's id")
    trigger.add_argument("--input", default="null", metavar="JSON",
                         help="the run input as JSON; @PATH reads it from a file, - from standard input")  # fmt: skip
    trigger.add_argument("--wait", action="store_true",
                         help="wait for the run to end and print it; exit status 0 only when it succeeded")  # fmt: skip
    trigger.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                         help="with --wait: give up after this long (exit status 3; the run goes on)")  # fmt: skip
    trigger.add_argument("--idempotency-key", metavar="KEY", help="the same key again names the same run")
    trigger.add_argument("--parent-run-id", metavar="RUN_ID", help="link the run to a parent run (a nested run)")
    trigger.add_argument("--fail-parent-on-failure", action="store_true",
                         help="with --parent-run-id: the parent fails when this run fails")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_trigger(args, _input(args.input)))


def _input(text: str) -> Any:
    try:
        if text == "-":
            text = sys.stdin.read()
        elif text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        return json.loads(text)
    except OSError as exc:
        raise LauncherError(f"--input: {exc}") from None
    except ValueError as exc:
        raise LauncherError(f"--input is not JSON: {exc}") from None


def _key() -> str:
    return os.environ.get("FLOWTRAIL_API_KEY") or read_api_key(StackPaths.of(CommonSettings()))


async def _trigger(args: argparse.Namespace, run_input: Any) -> int:
    key = _key()
    headers = {"Authorization": f"Bearer {key}", "X-Flowtrail-Trigger": "manual"}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    if args.parent_run_id:
        headers["ap-parent-run-id"] = args.parent_run_id
        headers["ap-fail-parent-on-failure"] = "true" if args.fail_parent_on_failure else "false"
    elif args.fail_parent_on_failure:
        raise LauncherError("--fail-parent-on-failure needs --parent-run-id")
    ingest = os.environ.get("FLOWTRAIL_INGEST_URL", INGEST_URL).rstrip("/")
    api = os.environ.get("FLOWTRAIL_API_URL", API_URL).rstrip("/")
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await _call(http, "POST", f"{ingest}/v1/flows/{args.flow}/trigger", headers,
                             json={"input": run_input})  # fmt: skip
        run_id = answer["run_id"]
        print(f"{run_id} {answer['status']}", flush=True)
        if not args.wait:
            return 0
        detail = await _wait(http, f"{api}/v1/runs/{run_id}", headers["Authorization"], args.timeout)
    if detail is None:
        print(f"{run_id} still running after {args.timeout:g} s", file=sys.stderr)
        return 3
    print(json.dumps(_summary(detail), indent=2, ensure_ascii=False))
    return 0 if detail["status"] in _SUCCEEDED else 1


async def _call(http: httpx.AsyncClient, method: str, url: str, headers: dict[str, str], **kwargs: Any) -> Any:
    try:
        r = await http.request(method, url, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        raise LauncherError(f"{url}: {exc!r}; is Flowtrail running (`flowtrail status`)?") from None
    if r.status_code >= 400:
        try:
            error = r.json()["error"]
            reason = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            reason = r.text[:500]
        raise LauncherError(f"{method} {url} answered {r.status_code} {reason}")
    return r.json()


async def _wait(http: httpx.AsyncClient, url: str, authorization: str, within_s: float) -> dict[str, Any] | None:
    """The run's detail once it is final; None when `within_s` seconds pass first."""
    deadline = time.monotonic() + within_s
    delay = 0.1
    while time.monotonic() < deadline:
        r = await http.get(url, headers={"Authorization": authorization})
        if r.status_code == 200 and r.json()["status"] in _TERMINAL:
            return dict(r.json())
        if r.status_code not in (200, 404):  # 404: not yet visible through this API
            await _call(http, "GET", url, {"Authorization": authorization})
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    return None


def _summary(detail: dict[str, Any]) -> dict[str, Any]:
    """What a terminal shows of a finished run: its status, trigger, error and each step's status and output."""
    steps = [{"name": s["name"], "status": s["status"], "output": s.get("output")} for s in detail.get("steps", [])]
    return {"run_id": detail["id"], "status": detail["status"], "trigger": detail["trigger"],
            "error": detail.get("error"), "duration_ms": detail.get("duration_ms"), "steps": steps}  # fmt: skip
