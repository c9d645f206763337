"""`flowtrail trigger FLOW --input JSON [--wait]`: one run of a flow, started by hand through ingest and recorded as
trigger type `manual` with the key's id as its caller (docs/intake.md#manual-triggers-and-nested-runs).

The key is FLOWTRAIL_API_KEY, or the one `flowtrail up` wrote in the state folder; ingest and the API are
FLOWTRAIL_INGEST_URL and FLOWTRAIL_API_URL, or the local stack's addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deploy.launcher.errors import LauncherError
from deploy.launcher.stack import API_URL, INGEST_URL, StackPaths, read_api_key
from flowtrail.client import Client, FlowtrailConnectionError, FlowtrailError, Origin, WaitTimeout
from services.common.settings import CommonSettings

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
    return _trigger(args, _input(args.input))


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


def _trigger(args: argparse.Namespace, run_input: Any) -> int:
    key = _key()
    if args.fail_parent_on_failure and not args.parent_run_id:
        raise LauncherError("--fail-parent-on-failure needs --parent-run-id")
    origin: Origin = {"manual": True}
    if args.parent_run_id:
        origin["parent_run_id"] = args.parent_run_id
        origin["fail_parent_on_failure"] = args.fail_parent_on_failure
    ingest = os.environ.get("FLOWTRAIL_INGEST_URL", INGEST_URL)
    api = os.environ.get("FLOWTRAIL_API_URL", API_URL)
    with Client(api, key, ingest_url=ingest) as client, launcher_errors():
        accepted = client.triggers.trigger(args.flow, run_input, idempotency_key=args.idempotency_key, **origin)
        print(f"{accepted.run_id} {accepted.status}", flush=True)
        if not args.wait:
            return 0
        try:
            detail = client.runs.wait(accepted.run_id, timeout_s=args.timeout)
        except WaitTimeout:
            print(f"{accepted.run_id} still running after {args.timeout:g} s", file=sys.stderr)
            return 3
    print(json.dumps(_summary(detail.model_dump(mode="json", exclude_unset=True)), indent=2, ensure_ascii=False))
    return 0 if detail.status in _SUCCEEDED else 1


@contextmanager
def launcher_errors() -> Iterator[None]:
    """The client's errors as the launcher's one-line refusals: `METHOD URL answered STATUS code: message`, or
    the address that did not answer."""
    try:
        yield
    except FlowtrailConnectionError as exc:
        raise LauncherError(f"{exc.url}: {exc.__cause__!r}; is Flowtrail running (`flowtrail status`)?") from None
    except WaitTimeout:
        raise
    except FlowtrailError as exc:
        reason = f"{exc.code}: {exc.message}" if exc.code else exc.message
        raise LauncherError(f"{exc.method} {exc.url} answered {exc.status} {reason}") from None


def _summary(detail: dict[str, Any]) -> dict[str, Any]:
    """What a terminal shows of a finished run: its status, trigger, error and each step's status and output."""
    steps = [{"name": s["name"], "status": s["status"], "output": s.get("output")} for s in detail.get("steps", [])]
    return {"run_id": detail["id"], "status": detail["status"], "trigger": detail["trigger"],
            "error": detail.get("error"), "duration_ms": detail.get("duration_ms"), "steps": steps}  # fmt: skip
