"""Pieces of the running local stack: where things are, the services' environment, stack.json, API key file, banner."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deploy.launcher.errors import LauncherError
from deploy.launcher.procs import live_pid_from_file, remove_file
from services.common.settings import (
    DEFAULT_API_PORT,
    DEFAULT_INGEST_PORT,
    DEFAULT_KAFKA_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_POSTGRES_PORT,
    CommonSettings,
)

log = logging.getLogger("flowtrail.launcher")

API_URL = f"http://127.0.0.1:{DEFAULT_API_PORT}"
INGEST_URL = f"http://127.0.0.1:{DEFAULT_INGEST_PORT}"
HEALTH_TIMEOUT = 90.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Command-line fragments that identify a launcher process (pid files can be stale and pids reused).
LAUNCHER_MARKERS = ("deploy.launcher", "bin/flowtrail")


class _InStateDir:
    """A StackPaths attribute: the path at `parts` below the state folder."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, paths: StackPaths, owner: type[StackPaths]) -> Path:
        return paths.state_dir.joinpath(*self.parts)


@dataclass(frozen=True)
class StackPaths:
    """Where the launcher keeps its files inside the state folder."""

    state_dir: Path

    logs = _InStateDir("logs")
    api_key = _InStateDir("api_key")
    stack_json = _InStateDir("stack.json")
    supervisor_pid = _InStateDir("supervisor.pid")
    supervisor_log = _InStateDir("logs", "supervisor.log")

    @classmethod
    def of(cls, settings: CommonSettings) -> StackPaths:
        return cls(Path(settings.state_dir).resolve())


def running_supervisor(paths: StackPaths) -> int | None:
    """The pid of a live launcher (``flowtrail up``) recorded in ``supervisor.pid``, if any."""
    for marker in LAUNCHER_MARKERS:
        pid = live_pid_from_file(paths.supervisor_pid, marker)
        if pid is not None:
            return pid
    return None


def kafka_endpoint(settings: CommonSettings) -> tuple[str, int, int]:
    """Host, port and controller port of the broker named first in ``kafka_bootstrap``."""
    first = settings.kafka_bootstrap.split(",")[0].strip()
    host, _, port_text = first.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise LauncherError(f"FLOWTRAIL_KAFKA_BOOTSTRAP={settings.kafka_bootstrap!r} is not host:port") from None
    host = host.strip("[]") or "127.0.0.1"
    controller = DEFAULT_KAFKA_CONTROLLER_PORT if port == DEFAULT_KAFKA_PORT else port + 1
    return host, port, controller


def postgres_endpoint(settings: CommonSettings) -> tuple[str, int]:
    """Host and port of ``database_url``."""
    parts = urlsplit(settings.database_url)
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_POSTGRES_PORT


def service_env(settings: CommonSettings) -> dict[str, str]:
    """The environment of every service: ours, plus every CommonSettings value as a FLOWTRAIL_* variable."""
    env = dict(os.environ)
    # The secrets key is not passed on from the settings (its dump is masked): a set FLOWTRAIL_SECRETS_KEY is in
    # os.environ already, otherwise every service reads the same key file.
    for key, value in settings.model_dump(mode="json", exclude={"secrets_key"}).items():
        env[f"FLOWTRAIL_{key.upper()}"] = str(value)
    # Local flows call services on loopback, which the executor refuses by default.
    env["FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS"] = "true"
    # Local webhook receivers (a script on this machine) are the norm when developing.
    env.setdefault("FLOWTRAIL_PROJECTOR_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true")
    env.setdefault("FLOWTRAIL_API_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true")
    env.setdefault("FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS", "true")  # local databases and services
    env.setdefault("FLOWTRAIL_INGEST_ALLOW_PRIVATE_NETWORKS", "true")  # a kafka trigger's connector on this machine
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_api_key(paths: StackPaths, api_key: str) -> None:
    """Save the API key readable by its owner only (0600)."""
    paths.api_key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.api_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{api_key}\n".encode())
    finally:
        os.close(fd)


def read_api_key(paths: StackPaths) -> str:
    try:
        key = paths.api_key.read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        raise LauncherError(f"no API key in {paths.api_key}; start the stack first with `flowtrail up`")
    return key


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_stack_json(paths: StackPaths) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.stack_json.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_own_files(paths: StackPaths) -> None:
    """Remove stack.json and supervisor.pid when they belong to this process."""
    data = read_stack_json(paths)
    if data is not None and data.get("supervisor_pid") == os.getpid():
        remove_file(paths.stack_json)
    if paths.supervisor_pid.exists() and paths.supervisor_pid.read_text().strip() == str(os.getpid()):
        remove_file(paths.supervisor_pid)


def banner(stack: dict[str, Any], api_key: str, paths: StackPaths) -> str:
    """The short text `flowtrail up` prints once everything is healthy."""
    flow_id = stack.get("example_flow_id") or "<flow_id>"
    kafka = stack.get("kafka", {})
    pg = stack.get("postgres", {})
    key_file = paths.api_key
    lines = [
        "",
        "Flowtrail is up.",
        f"  API         {stack['api_url']}",
        f"  Ingest      {stack['ingest_url']}",
        f"  API key     {api_key}   (saved in {key_file})",
        f"  Tenant      {stack.get('tenant_id') or '-'}",
        f"  Kafka       {kafka.get('bootstrap', '-')}   PostgreSQL {pg.get('dsn', '-')}",
        f"  Logs        {paths.logs}/  (api.log, ingest.log, executor.log, projector.log, kafka.log, ...)",
        *(
            [
                f"  Cluster     {kafka['brokers']} brokers, replication factor {kafka['replication_factor']}; "
                "`flowtrail status` shows every member"
            ]
            if kafka.get("brokers", 1) > 1
            else []
        ),
        "",
        "Try:",
        f"  KEY=$(cat {key_file})",
        f'  curl -H "Authorization: Bearer $KEY" {stack["api_url"]}/v1/runs',
        '  curl -X POST -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\',
        f'       -d \'{{"input": {{"name": "world"}}}}\' {stack["ingest_url"]}/v1/flows/{flow_id}/trigger',
        "",
    ]
    return "\n".join(lines)
