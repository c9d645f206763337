"""The one test harness for e2e and integration tests: a running Flowtrail (real processes on one sandbox of the
real broker and database), tenants and keys, flows published through the flows topic, a client for ingest and the
API, trigger, wait-for-status, and a stub upstream on loopback.

A test module builds its environment with `running()`::

    @pytest.fixture(scope="module")
    async def env(infra, tmp_path_factory):
        async with running(infra, tmp_path_factory, tenants=("tenant-a", "tenant-b"), flows=my_flows) as env:
            yield env

and then talks to it through `env.trigger(...)`, `env.api(...)`, `env.wait_status(...)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from schemas.events import FlowVersionPublished
from schemas.flows import FlowDefinition
from schemas.status import TERMINAL_RUN_STATUSES
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port

ALL_SERVICES = ("ingest", "executor", "projector", "api")
TERMINAL: frozenset[str] = frozenset(s.value for s in TERMINAL_RUN_STATUSES)


def auth(key: str, **extra: str) -> dict[str, str]:
    """Request headers carrying an API key (and any extra headers)."""
    return {"Authorization": f"Bearer {key}", **extra}


async def wait_until(check: Callable[[], Awaitable[Any]], within: float = 30, what: str = "condition") -> Any:
    """Poll `check` every 50 ms until it returns something truthy (returned); fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not (result := await check()):
        assert time.monotonic() < deadline, f"{what} not met within {within} s"
        await asyncio.sleep(0.05)
    return result


@dataclass(frozen=True)
class KeySpec:
    """An API key to create: its tenant and, when not the defaults, its environment and scopes."""

    tenant: str
    environment: str | None = None
    scopes: Sequence[str] | None = None


def flow(tenant: str, flow_id: str, steps: list[dict[str, Any]], **fields: Any) -> FlowDefinition:
    """A version-1 flow definition, validated as a publish would."""
    body = {"tenant_id": tenant, "id": flow_id, "name": fields.pop("name", flow_id.title()), "version": 1}
    return FlowDefinition.model_validate({**body, "steps": steps, **fields})


async def publish_flows(sandbox: Sandbox, flows: Iterable[FlowDefinition]) -> int:
    """Publish each flow's version to the sandbox's flows topic, as `POST /v1/flows` does; how many."""
    events = [FlowVersionPublished(tenant_id=f.tenant_id, flow_id=f.id, flow_version=f.version, flow=f) for f in flows]
    await publish_flow_events(sandbox.infra.kafka_bootstrap, sandbox.topics, events)
    return len(events)


async def wait_flows_projected(sandbox: Sandbox, count: int, within: float = 30) -> None:
    """Wait until the projector has at least `count` flows in the read model."""
    conn = await connect(sandbox.infra.database_url, sandbox.schema)
    try:
        await wait_until(lambda: _at_least(conn, count), within, f"{count} flows projected")
    finally:
        await conn.close()


async def _at_least(conn: Any, count: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM flows") >= count)


async def make_keys(sandbox: Sandbox, keys: Mapping[str, KeySpec | str]) -> dict[str, str]:
    """Create every tenant named in `keys` and one API key per name; name → plaintext key."""
    specs = {name: KeySpec(spec) if isinstance(spec, str) else spec for name, spec in keys.items()}
    conn = await connect(sandbox.infra.database_url, sandbox.schema)
    try:
        for tenant in dict.fromkeys(s.tenant for s in specs.values()):
            await ensure_tenant(conn, tenant, tenant.upper())
        out = {}
        for name, spec in specs.items():
            options: dict[str, Any] = {}
            if spec.environment:
                options["environment"] = spec.environment
            if spec.scopes is not None:
                options["scopes"] = list(spec.scopes)
            out[name] = (await create_api_key(conn, spec.tenant, **options))[1]
        return out
    finally:
        await conn.close()


@dataclass
class Env:
    """A running Flowtrail on one sandbox, with named API keys; the first key is the default caller."""

    sandbox: Sandbox
    stack: Stack
    keys: dict[str, str]

    @property
    def infra(self) -> Infra:
        return self.sandbox.infra

    @property
    def key(self) -> str:
        return next(iter(self.keys.values()))

    def url(self, service: str) -> str:
        return self.stack[service].url

    def _key(self, key: str | None) -> str:
        """A key's name in `keys`, or a plaintext key, or None for the default one."""
        if key is None:
            return self.key
        return self.keys.get(key, key)

    def client(self, service: str = "api", key: str | None = None, timeout: float = 15) -> httpx.AsyncClient:
        """An HTTP client for one service, authenticated with `key` (a name in `keys` or a plaintext key)."""
        return httpx.AsyncClient(base_url=self.url(service), timeout=timeout, headers=auth(self._key(key)))

    async def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        async with self.client("api", key) as client:
            return await client.request(method, path, **kwargs)

    async def ingest(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        async with self.client("ingest", key) as client:
            return await client.request(method, path, **kwargs)

    async def trigger(self, flow_id: str, payload: Any = None, key: str | None = None, **body: Any) -> str:
        """Trigger one run through ingest (must be accepted: 202); its run id."""
        r = await self.ingest("POST", f"/v1/flows/{flow_id}/trigger", key, json={"input": payload, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["run_id"])

    async def trigger_many(self, flow_id: str, inputs: list[Any], key: str | None = None, **body: Any) -> list[str]:
        """Trigger one run per input in one request (must be accepted: 202); their run ids in input order."""
        r = await self.ingest("POST", f"/v1/flows/{flow_id}/trigger", key, json={"inputs": inputs, **body})
        assert r.status_code == 202, r.text
        return [str(run_id) for run_id in r.json()["run_ids"]]

    async def run(self, run_id: str, key: str | None = None) -> dict[str, Any] | None:
        """The run's detail, or None while it is not (yet) visible to this key."""
        r = await self.api("GET", f"/v1/runs/{run_id}", key)
        assert r.status_code in (200, 404), r.text
        return dict(r.json()) if r.status_code == 200 else None

    async def wait_status(self, run_id: str, statuses: Iterable[str] = TERMINAL, within: float = 30,
                          key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Wait until the run's status is one of `statuses` (by default: any terminal one); its detail."""
        wanted = set(statuses)
        deadline = time.monotonic() + within
        while True:
            run = await self.run(run_id, key)
            if run is not None and run["status"] in wanted:
                return run
            if time.monotonic() > deadline:
                where = "\n".join(f"--- {n}\n{s.log_tail()}" for n, s in self.stack.services.items())
                raise AssertionError(f"run {run_id} not {sorted(wanted)} within {within} s: {run}\n{where}")
            await asyncio.sleep(0.05)

    async def events(self, run_id: str, key: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """The run's events from the API, checked gap-free (seq 0..n-1, as the executor numbered them)."""
        r = await self.api("GET", f"/v1/runs/{run_id}/events", key, params={"limit": limit})
        assert r.status_code == 200, r.text
        events = list(r.json()["data"])
        assert [e["seq"] for e in events] == list(range(len(events))), [e["seq"] for e in events]
        return events

    async def event_types(self, run_id: str, key: str | None = None) -> list[str]:
        """The run's event types, without log lines (those are at GET /v1/runs/{id}/logs)."""
        return [e["type"] for e in await self.events(run_id, key) if e["type"] != "LogEmitted"]

    async def db(self) -> Any:
        """A connection to the sandbox's schema (the caller closes it)."""
        return await connect(self.infra.database_url, self.sandbox.schema)


@asynccontextmanager
async def running(
    infra: Infra,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    keys: Mapping[str, KeySpec | str] | None = None,
    flows: Iterable[FlowDefinition] = (),
    services: Sequence[str] = ALL_SERVICES,
    partitions: int = 2,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Env]:
    """A sandbox, its tenants and keys (default: one key `a` for tenant-a), `flows` published and projected, and
    `services` running as real processes with the extra environment `env`. Everything is stopped on exit."""
    async with make_sandbox(infra, partitions) as sandbox:
        made = await make_keys(sandbox, keys or {"a": "tenant-a"})
        published = await publish_flows(sandbox, flows)
        stack = Stack.build(sandbox, tuple(services), tmp_path_factory.mktemp("logs"), **dict(env or {}))
        await stack.start()
        try:
            if published and "projector" in services:
                await wait_flows_projected(sandbox, published)
            yield Env(sandbox, stack, made)
        finally:
            stack.stop()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """A stub upstream HTTP server on loopback: its base URL and every request it was sent, in order."""

    url: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    bodies: list[bytes] = field(default_factory=list)

    def count(self, path: str) -> int:
        return sum(1 for _, p in self.calls if p == path)


@asynccontextmanager
async def stub_upstream(routes: Mapping[tuple[str, str], Handler]) -> AsyncIterator[Upstream]:
    """Serve `routes` ((method, path) → aiohttp handler) on a free loopback port, recording every request."""
    upstream = Upstream()

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        upstream.calls.append((request.method, request.path))
        upstream.bodies.append(await request.read())
        return await handler(request)

    app = web.Application(middlewares=[record], client_max_size=64 * 1024 * 1024)
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        await runner.cleanup()
