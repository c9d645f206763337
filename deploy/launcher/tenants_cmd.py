"""`flowtrail tenants create NAME | list | show ID | set-retention ID --metadata-days N --payload-days N`: tenant
administration through the running API's operator routes (docs/tenants.md).

The operator key is FLOWTRAIL_API_OPERATOR_KEY, or the one `flowtrail up` wrote in the state folder
(`<state>/operator_key`, mode 600); the API is FLOWTRAIL_API_URL, or the local stack's address.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from deploy.launcher.errors import LauncherError
from deploy.launcher.stack import API_URL
from deploy.launcher.trigger_cmd import _call
from services.common.settings import CommonSettings

OPERATOR_KEY_FILE = "operator_key"
OPERATOR_KEY_PREFIX = "ft_op_"


def operator_key_path(state_dir: Path) -> Path:
    return Path(state_dir) / OPERATOR_KEY_FILE


def ensure_operator_key(state_dir: Path) -> str:
    """The operator key in the state folder, written there (mode 600, 256 random bits) the first time."""
    path = operator_key_path(state_dir)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key
    key = OPERATOR_KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{key}\n".encode())
    finally:
        os.close(fd)
    return key


def _operator_key() -> str:
    key = os.environ.get("FLOWTRAIL_API_OPERATOR_KEY", "").strip()
    if key:
        return key
    path = operator_key_path(CommonSettings().state_dir)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        raise LauncherError(f"no operator key: set FLOWTRAIL_API_OPERATOR_KEY or start the stack with `flowtrail up` "
                            f"(it writes one to {path})")  # fmt: skip
    return key


def add_parser(sub: Any) -> None:
    """The `tenants` subcommand and its jobs, on the launcher's subparsers."""
    tenants = sub.add_parser("tenants", help="create tenants, show them, set their retention (operator key)")
    jobs = tenants.add_subparsers(dest="job", required=True, metavar="JOB")
    create = jobs.add_parser("create", help="a new tenant and its first admin API key (printed once)")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--id", help="the tenant's id (default: tn_ and random hex digits)")
    create.add_argument("--testing", action="store_true", help="the first key is a TESTING key (ft_test_…)")
    jobs.add_parser("list", help="every tenant with its retention and quota")
    show = jobs.add_parser("show", help="one tenant")
    show.add_argument("id", metavar="ID")
    retention = jobs.add_parser("set-retention", help="days of run metadata and of payload bodies kept")
    retention.add_argument("id", metavar="ID")
    retention.add_argument("--metadata-days", type=int, metavar="N", help="runs older than N days are deleted")
    retention.add_argument("--payload-days", type=int, metavar="N", help="payloads older than N days are blanked")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(tenants(args, os.environ.get("FLOWTRAIL_API_URL", API_URL), _operator_key()))


async def tenants(args: argparse.Namespace, api_url: str, operator_key: str) -> int:
    base = f"{api_url.rstrip('/')}/v1/admin/tenants"
    headers = {"Authorization": f"Bearer {operator_key}"}
    async with httpx.AsyncClient(timeout=30) as http:
        if args.job == "create":
            body: dict[str, Any] = {"name": args.name, "environment": "TESTING" if args.testing else "PRODUCTION"}
            if args.id:
                body["id"] = args.id
            made = await _call(http, "POST", base, headers, json=body)
            print(_describe(made))
            print(f"\nadmin API key (shown once, store it now): {made['admin_key']['key']}")
        elif args.job == "list":
            after: str | None = None
            while True:
                page = await _call(
                    http, "GET", base, headers, params={"limit": 1000, **({"after": after} if after else {})}
                )
                for tenant in page["data"]:
                    print(_line(tenant))
                after = page["next_after"]
                if not after:
                    break
        elif args.job == "show":
            print(json.dumps(await _call(http, "GET", f"{base}/{args.id}", headers), indent=2))
        elif args.job == "set-retention":
            retention = {k: v for k, v in (("metadata_days", args.metadata_days), ("payload_days", args.payload_days))
                         if v is not None}  # fmt: skip
            if not retention:
                raise LauncherError("set-retention needs --metadata-days and/or --payload-days")
            print(_describe(await _call(http, "PATCH", f"{base}/{args.id}", headers, json={"retention": retention})))
    return 0


def _line(tenant: dict[str, Any]) -> str:
    r, quota = tenant["retention"], tenant["quotas"]["max_active_runs"]
    return (f"{tenant['id']}\t{tenant['name']}\tmetadata {r['metadata_days']} d\tpayloads {r['payload_days']} d\t"
            f"active runs quota {quota if quota is not None else '-'}\tkeys {tenant['active_api_keys']}")  # fmt: skip


def _describe(tenant: dict[str, Any]) -> str:
    r = tenant["retention"]
    return (f"tenant {tenant['id']} ({tenant['name']}): runs kept {r['metadata_days']} days, payloads "
            f"{r['payload_days']} days")  # fmt: skip
