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
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import httpx
import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from deploy.launcher.kafka import KafkaHandle, ensure_kafka
from deploy.launcher.supervisor import ServiceSpec, Supervisor
from schemas import codec
from schemas.events import EventBase, FlowVersionPublished
from schemas.flows import FlowDefinition
from schemas.status import TERMINAL_RUN_STATUSES
from services.common.auth import create_api_key, ensure_tenant
from services.common.db import connect
from services.common.kafka import publish_flow_events, topic_partitions
from services.projector import rebuild
from services.projector.settings import ProjectorSettings
from tests.conftest import Infra, Sandbox, make_sandbox
from tests.e2e.stack import Stack, free_port
from tests.factories import keep_history, produce

ALL_SERVICES = ("ingest", "executor", "projector", "api")
TERMINAL: frozenset[str] = frozenset(s.value for s in TERMINAL_RUN_STATUSES)


def auth(key: str, **extra: str) -> dict[str, str]:
    """Request headers carrying an API key (and any extra headers)."""
    return {"Authorization": f"Bearer {key}", **extra}


async def wait_until(check: Callable[[], Awaitable[Any]], within: float = 30, what: str = "condition",
                     every: float = 0.05, logs: Callable[[], str] | None = None) -> Any:  # fmt: skip
    """Poll `check` every `every` seconds until it returns something truthy (returned); fail after `within` seconds
    (with `logs()` in the message when given)."""
    deadline = time.monotonic() + within
    while not (result := await check()):
        assert time.monotonic() < deadline, f"{what} not met within {within} s" + (f"\n{logs()}" if logs else "")
        await asyncio.sleep(every)
    return result


async def wait_sql(db: Any, query: str, *args: Any, within: float = 30, what: str | None = None,
                   logs: Callable[[], str] | None = None, every: float = 0.05) -> Any:  # fmt: skip
    """Poll `query`'s first value on `db` (a connection or a pool) until it is truthy; that value."""
    return await wait_until(lambda: db.fetchval(query, *args), within, what or query, every=every, logs=logs)


@dataclass(frozen=True)
class KeySpec:
    """An API key to create: its tenant and, when not the defaults, its environment and scopes."""

    tenant: str
    environment: str | None = None
    scopes: Sequence[str] | None = None
    name: str | None = None  # the key's own name, as GET /v1/api-keys shows it


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
    return {name: key for name, (_, key) in (await make_keys_with_ids(sandbox, keys)).items()}


async def make_keys_with_ids(sandbox: Sandbox, keys: Mapping[str, KeySpec | str]) -> dict[str, tuple[str, str]]:
    """Create every tenant named in `keys` and one API key per name; name → (key id, plaintext key)."""
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
            if spec.name is not None:
                options["name"] = spec.name
            out[name] = await create_api_key(conn, spec.tenant, **options)
        return out
    finally:
        await conn.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    """One request a stub upstream was sent; `status` is its answer's, None while it is being answered."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    at: datetime
    query: Mapping[str, str] = field(default_factory=dict)
    status: int | None = None

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def key(self) -> str:
        """The Idempotency-Key a step runner sends with every attempt ('' without one)."""
        return self.headers.get("Idempotency-Key", "")

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Upstream:
    """A stub upstream HTTP server on loopback: its base URL and every request it was sent, in order."""

    url: str = ""
    requests: list[Call] = field(default_factory=list)

    @property
    def calls(self) -> list[tuple[str, str]]:  # (method, path)
        return [(c.method, c.path) for c in self.requests]

    @property
    def bodies(self) -> list[bytes]:
        return [c.body for c in self.requests]

    def count(self, path: str) -> int:
        return sum(1 for c in self.requests if c.path == path)

    def seen(self, path: str, method: str | None = None) -> list[Call]:
        return [c for c in self.requests if c.path == path and method in (None, c.method)]

    def in_flight(self, path: str) -> list[Call]:
        return [c for c in self.seen(path) if not c.answered]

    def statuses(self, path: str, method: str | None = None) -> list[int | None]:
        """What each request to `path` was answered, in order."""
        return [c.status for c in self.seen(path, method)]


CALL = web.RequestKey("call", Call)  # the recorded Call, on each request a stub upstream handles


@asynccontextmanager
async def stub_upstream(routes: Mapping[tuple[str, str], Handler], app: web.Application | None = None
                        ) -> AsyncIterator[Upstream]:  # fmt: skip
    """Serve `routes` ((method, path) → aiohttp handler), added to `app` when given (a fake system's own), on a free
    loopback port, recording every request."""
    upstream = Upstream()

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        call = Call(request.method, request.path, dict(request.headers), body, datetime.now(UTC), dict(request.query))
        upstream.requests.append(call)
        request[CALL] = call
        response = await handler(request)
        call.status = response.status
        return response

    if app is None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
    app.middlewares.append(record)
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        await runner.cleanup()


def answer(body: Any = None, status: int = 200) -> Handler:
    """A handler that always answers `body` as JSON with `status`."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    return handle


def delayed(seconds: float, handler: Handler) -> Handler:
    """`handler`, answering `seconds` late (a slow upstream)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await handler(request)

    return handle


def first_calls(times: int | Callable[[Call], int], first: Handler, then: Handler,
                per: Callable[[Call], Any] = lambda call: call.path) -> Handler:  # fmt: skip
    """The first `times` requests of each `per(call)` (default: each path) are answered by `first`, later ones by
    `then`: an upstream that fails before it works (`first=answer({...}, 503)`), or is slow only the first time."""
    seen: Counter[Any] = Counter()

    async def handle(request: web.Request) -> web.StreamResponse:
        call = request[CALL]
        group = per(call)
        seen[group] += 1
        limit = times(call) if callable(times) else times
        return await (first if seen[group] <= limit else then)(request)

    return handle


@dataclass
class Env:
    """A running Flowtrail on one sandbox, with named API keys; the first key is the default caller."""

    sandbox: Sandbox
    stack: Stack
    keys: dict[str, str]
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=30))
    upstream: Upstream = field(default_factory=Upstream)
    key_ids: dict[str, str] = field(default_factory=dict)

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

    async def request(self, service: str, method: str, path: str, key: str | None = None,
                      **kwargs: Any) -> httpx.Response:  # fmt: skip
        """One request to a service with `key`'s Authorization (and any `headers` given), on the shared client."""
        headers = {**auth(self._key(key)), **kwargs.pop("headers", {})}
        return await self.http.request(method, self.url(service) + path, headers=headers, **kwargs)

    async def api(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return await self.request("api", method, path, key, **kwargs)

    async def ingest(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return await self.request("ingest", method, path, key, **kwargs)

    async def ok(self, method: str, path: str, key: str | None = None, status: int = 200, **kwargs: Any) -> Any:
        """An API request that must answer `status`; its JSON body (None when empty)."""
        r = await self.api(method, path, key, **kwargs)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

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

    async def create_flow(self, body: Mapping[str, Any], key: str | None = None) -> None:
        """Publish a flow through `POST /v1/flows` and wait until the API shows it (a 202 is written, not yet
        projected)."""
        r = await self.api("POST", "/v1/flows", key, json=body)
        assert r.status_code in (201, 202), r.text

        async def shown() -> bool:
            return (await self.api("GET", f"/v1/flows/{body['id']}", key)).status_code == 200

        await wait_until(shown, 30, f"flow {body['id']} projected")

    async def publish(self, flows: Sequence[FlowDefinition]) -> None:
        """Publish flow versions to the flows topic and wait until the projector has them all."""
        conn = await self.db()
        try:
            before = await conn.fetchval("SELECT count(*) FROM flows")
        finally:
            await conn.close()
        await wait_flows_projected(self.sandbox, before + await publish_flows(self.sandbox, flows))

    async def run(self, run_id: str, key: str | None = None) -> dict[str, Any] | None:
        """The run's detail, or None while it is not (yet) visible to this key."""
        r = await self.api("GET", f"/v1/runs/{run_id}", key)
        assert r.status_code in (200, 404), r.text
        return dict(r.json()) if r.status_code == 200 else None

    def log_tails(self) -> str:
        return "\n".join(f"--- {n}\n{s.log_tail()}" for n, s in self.stack.services.items())

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
                raise AssertionError(f"run {run_id} not {sorted(wanted)} within {within} s: {run}\n{self.log_tails()}")
            await asyncio.sleep(0.05)

    async def wait_step(self, run_id: str, step: str, statuses: Iterable[str], within: float = 30,
                        key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Wait until the run's step `step` is in one of `statuses`; the run's detail."""
        wanted = set(statuses)

        async def reached() -> dict[str, Any] | None:
            run = await self.run(run_id, key)
            return run if step_status(run, step) in wanted else None

        return dict(await wait_until(reached, within, f"run {run_id} step {step} {sorted(wanted)}", every=0.02,
                                     logs=self.log_tails))  # fmt: skip

    async def wait_all(self, run_ids: Sequence[str], key: str | None = None, within: float = 90) -> dict[str, str]:
        """Wait until every run is final; run id → final status."""
        final: dict[str, str] = {}

        async def done() -> bool:
            for run_id in [r for r in run_ids if r not in final][:200]:
                run = await self.run(run_id, key)
                if run is not None and run["status"] in TERMINAL:
                    final[run_id] = run["status"]
            return len(final) == len(run_ids)

        await wait_until(done, within, f"{len(run_ids)} runs final", every=0.1, logs=self.log_tails)
        return final

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


def whole_sync(name: str, source: str, records_path: str, destination: str, mapping: Mapping[str, str],
               **fields: Any) -> dict[str, Any]:  # fmt: skip
    """A sync_records step that reads every record of the loopback `source` (no cursor window: the stub takes no
    `updated_*` parameters) and writes each, by its `id`, to `destination`; not retried."""
    source_spec = {"kind": "http", "url": source, "records_path": records_path, "updated_since_param": None,
                   "updated_until_param": None}  # fmt: skip
    spec = {"source": source_spec, "destination": {"kind": "http", "url": destination}, "key": "id"}
    return {"name": name, "action": "sync_records", "retry": {"delays_s": []},
            "input": {**spec, "mapping": dict(mapping), **fields}}  # fmt: skip


def steps_of(run: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A run detail's steps by name."""
    return {s["name"]: s for s in run["steps"]}


def step_status(run: Mapping[str, Any] | None, step: str) -> str | None:
    """The status of a run's step `step` (None without a run or before the step began)."""
    return next((s["status"] for s in run["steps"] if s["name"] == step), None) if run else None


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
    upstream: Upstream | None = None,
) -> AsyncIterator[Env]:
    """A sandbox, its tenants and keys (default: one key `a` for tenant-a), `flows` published and projected, and
    `services` running as real processes with the extra environment `env`. Everything is stopped on exit."""
    async with make_sandbox(infra, partitions) as sandbox:
        made = await make_keys_with_ids(sandbox, keys or {"a": "tenant-a"})
        published = await publish_flows(sandbox, flows)
        stack = Stack.build(sandbox, tuple(services), tmp_path_factory.mktemp("logs"), **dict(env or {}))
        await stack.start()
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                if published and "projector" in services:
                    await wait_flows_projected(sandbox, published)
                yield Env(sandbox, stack, {n: k for n, (_, k) in made.items()}, http, upstream or Upstream(),
                          {n: i for n, (i, _) in made.items()})  # fmt: skip
        finally:
            stack.stop()


# ---------------------------------------------------------------- Kafka and the projector, read directly


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
    """The end offset of every partition of `topics` (those that exist)."""
    known = await topic_partitions(bootstrap, list(topics))
    parts = [TopicPartition(t, p) for t, ps in known.items() for p in ps]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


Record: TypeAlias = ConsumerRecord[bytes, bytes]


async def topic_records(bootstrap: str, topics: Sequence[str], within: float = 30) -> list[Record]:
    """Every record of `topics` from offset 0 to the end as it was when called: partition after partition, each in
    log order."""
    known = await topic_partitions(bootstrap, list(topics))
    parts = [TopicPartition(t, p) for t in topics for p in known.get(t, [])]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        records: list[Record] = []
        for tp in parts:
            deadline = time.monotonic() + within
            while await consumer.position(tp) < ends[tp]:
                assert time.monotonic() < deadline, f"{tp} not read to its end"
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
                records += [r for r in batch.get(tp, []) if r.offset < ends[tp]]
        return records
    finally:
        await consumer.stop()


async def ledger(sandbox: Sandbox) -> list[EventBase]:
    """The sandbox's whole ledger topic from offset 0, decoded: partition after partition, each in log order."""
    records = await topic_records(sandbox.infra.kafka_bootstrap, [sandbox.topics.ledger])
    return [codec.decode_ledger_event(r.value) for r in records if r.value is not None]


def projector_settings(sandbox: Sandbox) -> ProjectorSettings:
    return ProjectorSettings(kafka_bootstrap=sandbox.infra.kafka_bootstrap, database_url=sandbox.infra.database_url,
                             database_schema=sandbox.schema, topic_prefix=sandbox.topics.prefix)  # fmt: skip


async def assert_verify_equal(sandbox: Sandbox) -> rebuild.Outcome:
    """`flowtrail projector verify`: a rebuild from the ledger must equal the live read models (invariant 1)."""
    progress: list[str] = []
    outcome = await rebuild.run(projector_settings(sandbox), swap=False, progress=progress.append)
    assert outcome.comparison.equal, (rebuild.describe(outcome.comparison), progress)
    return outcome


# ---------------------------------------------------------------- more processes, the ledger written directly, rows


# Webhook and alert deliveries to a stub on loopback (a private address, refused unless the deployment allows it).
LOOPBACK_WEBHOOKS = {
    "FLOWTRAIL_PROJECTOR_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    "FLOWTRAIL_API_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
}
# ... retried after 0.2 s and looked for every 50 ms, so retries show within a test.
FAST_WEBHOOKS = {
    **LOOPBACK_WEBHOOKS,
    "FLOWTRAIL_PROJECTOR_WEBHOOK_BACKOFF_S": "0.2",
    "FLOWTRAIL_PROJECTOR_WEBHOOK_POLL_S": "0.05",
}


@asynccontextmanager
async def also_running(env: Env, tmp_path_factory: pytest.TempPathFactory, services: Sequence[str] = ("api",),
                       extra_env: Mapping[str, str] | None = None) -> AsyncIterator[Stack]:  # fmt: skip
    """More processes on the env's sandbox (as when a service is scaled out), with the extra environment
    `extra_env`; stopped on exit."""
    stack = Stack.build(env.sandbox, tuple(services), tmp_path_factory.mktemp("logs"), **dict(extra_env or {}))
    await stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@asynccontextmanager
async def api_in_process(sandbox: Sandbox, tenant: str = "t1", **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The API app in this process (ASGI, no port) on the sandbox, its lifespan running, with `settings` on top of
    the sandbox's; a client holding a new key of `tenant` (the tenant is created too)."""
    from services.api.app import create_app
    from services.api.settings import ApiSettings

    key = (await make_keys(sandbox, {"key": tenant}))["key"]
    app = create_app(ApiSettings(database_url=sandbox.infra.database_url, database_schema=sandbox.schema,
                                 kafka_bootstrap=sandbox.infra.kafka_bootstrap, topic_prefix=sandbox.topics.prefix,
                                 **settings))  # fmt: skip
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api", headers=auth(key)) as client,
    ):
        yield client


async def append_ledger(sandbox: Sandbox, events: Sequence[EventBase], partitions: int | None = None) -> None:
    """Write events to the sandbox's ledger as the executor does, a run's events on one partition in order; with
    `partitions=1` the log order is the order given across runs too."""
    await produce(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, list(events), partitions or sandbox.partitions)


async def wait_projected(env: Env, records: int, within: float = 30) -> None:
    """Wait until the projector's stored offsets (the ledger's and the flows topic's together) reach `records`."""
    conn = await env.db()
    try:
        await wait_sql(conn, "SELECT coalesce(sum(next_offset), 0) >= $1 FROM projector_offsets", records,
                       within=within, what=f"{records} records projected", logs=env.log_tails)  # fmt: skip
    finally:
        await conn.close()


async def records_in(bootstrap: str, topic: str) -> int:
    """How many records `topic` holds now: end minus beginning offsets, over its partitions."""
    parts = [TopicPartition(topic, p) for p in (await topic_partitions(bootstrap, [topic]))[topic]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends, starts = await consumer.end_offsets(parts), await consumer.beginning_offsets(parts)
        return sum(ends[p] - starts[p] for p in parts)
    finally:
        await consumer.stop()


async def db_rows(env: Env, sql: str, *args: Any) -> list[Any]:
    """The rows of one statement on the env's database."""
    conn = await env.db()
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def keep_history_of(env: Env, *tenants: str) -> None:
    """`keep_history` for the env's tenants: runs written at fixed past dates are kept whatever day it is. Call it
    before writing them: the projector's purge at its start recorded marks under the default periods, and a run
    arriving older than its tenant's marks is purged as it is projected; those marks are waited for and forgotten
    (the next purge is an hour away)."""
    conn = await env.db()
    try:
        if "projector" in env.stack.services:
            await wait_sql(conn, "SELECT count(*) = $2 FROM retention_marks WHERE tenant_id = ANY($1::text[])",
                           list(tenants), len(tenants), what="the projector's first purge")  # fmt: skip
        async with conn.transaction():
            await keep_history(conn, *tenants)
            await conn.execute("DELETE FROM retention_marks WHERE tenant_id = ANY($1::text[])", list(tenants))
    finally:
        await conn.close()


def flow_body(flow_id: str, *steps: str, **fields: Any) -> dict[str, Any]:
    """A `POST /v1/flows` body: a transform step per name in `steps` (default: one, `only`), each answering
    {"step": its name}; `fields` are added (a `steps` or `name` given there wins)."""
    return {
        "id": flow_id,
        "name": fields.pop("name", flow_id.replace("-", " ").title()),
        "steps": [{"name": s, "action": "transform", "input": {"output": {"step": s}}} for s in steps or ("only",)],
        **fields,
    }


def api_error(r: httpx.Response, status: int, code: str | None = None) -> str:
    """An error answer: `status`, the envelope {"error": {code, message, request_id}} with `code` (any code when
    None), the request id echoed in X-Request-Id; its message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "request_id"} <= set(body["error"]), body
    assert code in (None, body["error"]["code"]) and body["error"]["request_id"], body
    assert r.headers["x-request-id"] == body["error"]["request_id"]
    return str(body["error"]["message"])


@asynccontextmanager
async def connected(env: Env) -> AsyncIterator[Any]:
    """A connection to the env's database, closed on exit."""
    conn = await env.db()
    try:
        yield conn
    finally:
        await conn.close()


# ---------------------------------------------------------------- faults: the supervisor, a private broker, a cut proxy

# The recovery figures of docs/operations.md#recovery-figures, with room for this shared two-core machine.
SLACK = 1.5


async def until_ready(env: Env, names: tuple[str, ...], since: float, within: float) -> dict[str, float]:
    """Seconds from `since` until each service answered 200 on /readyz."""
    ready: dict[str, float] = {}

    async def all_ready() -> bool:
        for name in names:
            try:
                answer = await env.http.get(f"{env.stack[name].url}/readyz", timeout=5)
                if name not in ready and answer.status_code == 200:
                    ready[name] = time.monotonic() - since
            except httpx.TransportError:  # not listening yet
                pass
        return len(ready) == len(names)

    await wait_until(all_ready, within, f"{names} ready", every=0.1, logs=env.log_tails)
    return ready


@asynccontextmanager
async def supervised(stack: Stack) -> AsyncIterator[Supervisor]:
    """The stack's services run by the launcher's supervisor (restarted after any exit, as `flowtrail up` does)."""
    supervisor = Supervisor(stack.log_dir, ready_url=lambda name: f"{stack[name].url}/readyz")
    for name, service in stack.services.items():
        supervisor.add(ServiceSpec.service(name, {**os.environ, **service.env}))
    await supervisor.start_all()
    try:
        yield supervisor
    finally:
        await supervisor.stop_all()


def private_broker(state: Path, port: int, controller: int) -> KafkaHandle:
    """A broker of the test's own in `state` (the shared one stays up): started, or the running one's handle."""
    return ensure_kafka(state, port=port, controller_port=controller, num_partitions=2, timeout=90)


def stop_pid(pid: int | None) -> None:
    """SIGTERM, and SIGKILL when still alive after 30 s."""
    assert pid is not None
    os.kill(pid, 15)
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)


class CutProxy:
    """A loopback TCP proxy in front of PostgreSQL that the test can cut: open connections drop and new ones are
    refused, as in a database outage, for this test's services only (the shared server stays up for everyone)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
