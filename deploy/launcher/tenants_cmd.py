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

from deploy.launcher.errors import LauncherError
from deploy.launcher.stack import API_URL
from deploy.launcher.trigger_cmd import launcher_errors
from flowtrail.client import AsyncClient
from flowtrail.client.models import AdminTenant, Tenant
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
    async with AsyncClient(api_url, operator_key) as client:
        with launcher_errors():
            await _job(client, args)
    return 0


async def _job(client: AsyncClient, args: argparse.Namespace) -> None:
    if args.job == "create":
        made = await client.tenants.create(args.name, id=args.id or None,
                                           environment="TESTING" if args.testing else "PRODUCTION")  # fmt: skip
        print(_describe(made))
        print(f"\nadmin API key (shown once, store it now): {made.admin_key.key}")
    elif args.job == "list":
        async for tenant in client.tenants.iter(page_size=1000):
            print(_line(tenant))
    elif args.job == "show":
        shown = await client.tenants.get(args.id)
        print(json.dumps(shown.model_dump(mode="json", exclude_unset=True), indent=2))
    elif args.job == "set-retention":
        if args.metadata_days is None and args.payload_days is None:
            raise LauncherError("set-retention needs --metadata-days and/or --payload-days")
        print(_describe(await client.tenants.update(args.id, metadata_days=args.metadata_days,
                                                    payload_days=args.payload_days)))  # fmt: skip


def _line(tenant: AdminTenant) -> str:
    r, quota = tenant.retention, tenant.quotas.max_active_runs
    return (f"{tenant.id}\t{tenant.name}\tmetadata {r.metadata_days} d\tpayloads {r.payload_days} d\t"
            f"active runs quota {quota if quota is not None else '-'}\tkeys {tenant.active_api_keys}")  # fmt: skip


def _describe(tenant: Tenant) -> str:
    r = tenant.retention
    return (f"tenant {tenant.id} ({tenant.name}): runs kept {r.metadata_days} days, payloads "
            f"{r.payload_days} days")  # fmt: skip
