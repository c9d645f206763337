"""`Client` (blocking) and `AsyncClient` (asyncio) over one set of calls (flowtrail/client/api.py): each resource
here names the calls it offers, and the driver runs them (docs/client.md)."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

import httpx

from flowtrail.client import api
from flowtrail.client.drivers import AsyncDriver, SyncDriver
from flowtrail.client.models import Session
from flowtrail.client.plan import Context, Items, Plan, RetryPolicy

P = ParamSpec("P")
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
S = TypeVar("S")

DEFAULT_API_URL = "http://127.0.0.1:8000"
USER_AGENT = "flowtrail-client"


class _Resource(Generic[S]):
    def __init__(self, spec: S, driver: Any) -> None:
        self._spec = spec
        self._driver = driver


def _sync(fn: Callable[Concatenate[S, P], Plan[T]]) -> Callable[Concatenate[_Resource[Any], P], T]:
    @functools.wraps(fn)
    def call(self: _Resource[Any], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._driver.run(fn(self._spec, *args, **kwargs))  # type: ignore[no-any-return]

    return call


def _sync_iter(fn: Callable[Concatenate[S, P], Items[I]]) -> Callable[Concatenate[_Resource[Any], P], Iterator[I]]:
    @functools.wraps(fn)
    def call(self: _Resource[Any], /, *args: P.args, **kwargs: P.kwargs) -> Iterator[I]:
        return self._driver.iterate(fn(self._spec, *args, **kwargs))  # type: ignore[no-any-return]

    return call


def _async(
    fn: Callable[Concatenate[S, P], Plan[T]],
) -> Callable[Concatenate[_Resource[Any], P], Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def call(self: _Resource[Any], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._driver.run(fn(self._spec, *args, **kwargs))  # type: ignore[no-any-return]

    return call


def _async_iter(
    fn: Callable[Concatenate[S, P], Items[I]],
) -> Callable[Concatenate[_Resource[Any], P], AsyncIterator[I]]:
    @functools.wraps(fn)
    def call(self: _Resource[Any], /, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[I]:
        return self._driver.iterate(fn(self._spec, *args, **kwargs))  # type: ignore[no-any-return]

    return call


# ---------------------------------------------------------------- the blocking client's resources


class Triggers(_Resource[api.TriggersApi]):
    __doc__ = api.TriggersApi.__doc__
    trigger = _sync(api.TriggersApi.trigger)
    trigger_many = _sync(api.TriggersApi.trigger_many)
    trigger_live = _sync(api.TriggersApi.trigger_live)
    trigger_and_wait = _sync(api.TriggersApi.trigger_and_wait)
    launch = _sync(api.TriggersApi.launch)
    launch_many = _sync(api.TriggersApi.launch_many)
    launch_live = _sync(api.TriggersApi.launch_live)


class Runs(_Resource[api.RunsApi]):
    __doc__ = api.RunsApi.__doc__
    get = _sync(api.RunsApi.get)
    steps = _sync(api.RunsApi.steps)
    list = _sync(api.RunsApi.list)
    iter = _sync_iter(api.RunsApi.iter)
    events = _sync(api.RunsApi.events)
    iter_events = _sync_iter(api.RunsApi.iter_events)
    logs = _sync(api.RunsApi.logs)
    iter_logs = _sync_iter(api.RunsApi.iter_logs)
    iter_record_errors = _sync_iter(api.RunsApi.iter_record_errors)
    diagnosis = _sync(api.RunsApi.diagnosis)
    stream = _sync_iter(api.RunsApi.stream)
    watch = _sync_iter(api.RunsApi.watch)
    wait = _sync(api.RunsApi.wait)
    retry = _sync(api.RunsApi.retry)
    cancel = _sync(api.RunsApi.cancel)
    resume = _sync(api.RunsApi.resume)
    archive = _sync(api.RunsApi.archive)
    bulk_retry = _sync(api.RunsApi.bulk_retry)
    bulk_cancel = _sync(api.RunsApi.bulk_cancel)
    bulk_archive = _sync(api.RunsApi.bulk_archive)


class Flows(_Resource[api.FlowsApi]):
    __doc__ = api.FlowsApi.__doc__
    list = _sync(api.FlowsApi.list)
    iter = _sync_iter(api.FlowsApi.iter)
    get = _sync(api.FlowsApi.get)
    version = _sync(api.FlowsApi.version)
    create = _sync(api.FlowsApi.create)
    publish = _sync(api.FlowsApi.publish)
    pause = _sync(api.FlowsApi.pause)
    resume = _sync(api.FlowsApi.resume)
    wait_projected = _sync(api.FlowsApi.wait_projected)


class Tenants(_Resource[api.TenantsApi]):
    __doc__ = api.TenantsApi.__doc__
    create = _sync(api.TenantsApi.create)
    list = _sync(api.TenantsApi.list)
    iter = _sync_iter(api.TenantsApi.iter)
    get = _sync(api.TenantsApi.get)
    update = _sync(api.TenantsApi.update)
    own = _sync(api.TenantsApi.own)


class Analytics(_Resource[api.AnalyticsApi]):
    __doc__ = api.AnalyticsApi.__doc__
    flow = _sync(api.AnalyticsApi.flow)
    flakiness = _sync(api.AnalyticsApi.flakiness)
    failure_groups = _sync(api.AnalyticsApi.failure_groups)
    endpoints = _sync(api.AnalyticsApi.endpoints)


class Alerts(_Resource[api.AlertsApi]):
    iter = _sync_iter(api.AlertsApi.iter)
    get = _sync(api.AlertsApi.get)


class Connectors(_Resource[api.ConnectorsApi]):
    iter = _sync_iter(api.ConnectorsApi.iter)
    get = _sync(api.ConnectorsApi.get)


# ---------------------------------------------------------------- the asyncio client's resources


class AsyncTriggers(_Resource[api.TriggersApi]):
    __doc__ = api.TriggersApi.__doc__
    trigger = _async(api.TriggersApi.trigger)
    trigger_many = _async(api.TriggersApi.trigger_many)
    trigger_live = _async(api.TriggersApi.trigger_live)
    trigger_and_wait = _async(api.TriggersApi.trigger_and_wait)
    launch = _async(api.TriggersApi.launch)
    launch_many = _async(api.TriggersApi.launch_many)
    launch_live = _async(api.TriggersApi.launch_live)


class AsyncRuns(_Resource[api.RunsApi]):
    __doc__ = api.RunsApi.__doc__
    get = _async(api.RunsApi.get)
    steps = _async(api.RunsApi.steps)
    list = _async(api.RunsApi.list)
    iter = _async_iter(api.RunsApi.iter)
    events = _async(api.RunsApi.events)
    iter_events = _async_iter(api.RunsApi.iter_events)
    logs = _async(api.RunsApi.logs)
    iter_logs = _async_iter(api.RunsApi.iter_logs)
    iter_record_errors = _async_iter(api.RunsApi.iter_record_errors)
    diagnosis = _async(api.RunsApi.diagnosis)
    stream = _async_iter(api.RunsApi.stream)
    watch = _async_iter(api.RunsApi.watch)
    wait = _async(api.RunsApi.wait)
    retry = _async(api.RunsApi.retry)
    cancel = _async(api.RunsApi.cancel)
    resume = _async(api.RunsApi.resume)
    archive = _async(api.RunsApi.archive)
    bulk_retry = _async(api.RunsApi.bulk_retry)
    bulk_cancel = _async(api.RunsApi.bulk_cancel)
    bulk_archive = _async(api.RunsApi.bulk_archive)


class AsyncFlows(_Resource[api.FlowsApi]):
    __doc__ = api.FlowsApi.__doc__
    list = _async(api.FlowsApi.list)
    iter = _async_iter(api.FlowsApi.iter)
    get = _async(api.FlowsApi.get)
    version = _async(api.FlowsApi.version)
    create = _async(api.FlowsApi.create)
    publish = _async(api.FlowsApi.publish)
    pause = _async(api.FlowsApi.pause)
    resume = _async(api.FlowsApi.resume)
    wait_projected = _async(api.FlowsApi.wait_projected)


class AsyncTenants(_Resource[api.TenantsApi]):
    __doc__ = api.TenantsApi.__doc__
    create = _async(api.TenantsApi.create)
    list = _async(api.TenantsApi.list)
    iter = _async_iter(api.TenantsApi.iter)
    get = _async(api.TenantsApi.get)
    update = _async(api.TenantsApi.update)
    own = _async(api.TenantsApi.own)


class AsyncAnalytics(_Resource[api.AnalyticsApi]):
    __doc__ = api.AnalyticsApi.__doc__
    flow = _async(api.AnalyticsApi.flow)
    flakiness = _async(api.AnalyticsApi.flakiness)
    failure_groups = _async(api.AnalyticsApi.failure_groups)
    endpoints = _async(api.AnalyticsApi.endpoints)


class AsyncAlerts(_Resource[api.AlertsApi]):
    iter = _async_iter(api.AlertsApi.iter)
    get = _async(api.AlertsApi.get)


class AsyncConnectors(_Resource[api.ConnectorsApi]):
    iter = _async_iter(api.ConnectorsApi.iter)
    get = _async(api.ConnectorsApi.get)


# ---------------------------------------------------------------- the clients


def _context(
    api_url: str | None,
    api_key: str | None,
    ingest_url: str | None,
    retry: RetryPolicy | None,
    timeout_s: float,
    headers: Mapping[str, str] | None,
) -> Context:
    """Arguments, else FLOWTRAIL_API_URL, FLOWTRAIL_API_KEY and FLOWTRAIL_INGEST_URL (triggers go to ingest when
    it is known, else to the API: both serve them)."""
    url = (api_url or os.environ.get("FLOWTRAIL_API_URL") or DEFAULT_API_URL).rstrip("/")
    ingest = (ingest_url or os.environ.get("FLOWTRAIL_INGEST_URL") or url).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("FLOWTRAIL_API_KEY")
    return Context(url, ingest, key, {"User-Agent": USER_AGENT, **(headers or {})}, retry or RetryPolicy(), timeout_s)


class _Specs:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.triggers = api.TriggersApi(ctx)
        self.runs = api.RunsApi(ctx)
        self.flows = api.FlowsApi(ctx)
        self.tenants = api.TenantsApi(ctx)
        self.analytics = api.AnalyticsApi(ctx)
        self.alerts = api.AlertsApi(ctx)
        self.connectors = api.ConnectorsApi(ctx)
        self.session = api.SessionApi(ctx)


class Client:
    """Flowtrail's API, blocking. `Client(api_url, api_key)`, or from FLOWTRAIL_API_URL and FLOWTRAIL_API_KEY;
    `ingest_url` (FLOWTRAIL_INGEST_URL) takes the triggers. Close it, or use it as a context manager."""

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        ingest_url: str | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self._own_http = http is None
        self.http = http or httpx.Client()
        specs = _Specs(_context(api_url, api_key, ingest_url, retry, timeout_s, headers))
        self.context = specs.ctx
        driver = SyncDriver(self.http)
        self._driver, self._session = driver, specs.session
        self.triggers = Triggers(specs.triggers, driver)
        self.runs = Runs(specs.runs, driver)
        self.flows = Flows(specs.flows, driver)
        self.tenants = Tenants(specs.tenants, driver)
        self.analytics = Analytics(specs.analytics, driver)
        self.alerts = Alerts(specs.alerts, driver)
        self.connectors = Connectors(specs.connectors, driver)

    def session(self) -> Session:
        """Who the key is: its tenant, environment, scopes and rate limits."""
        return self._driver.run(self._session.get())

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """Flowtrail's API with asyncio: as `Client`, every call awaited and every listing or stream an async
    iterator. Close it (`await client.aclose()`), or use it as an async context manager."""

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        ingest_url: str | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._own_http = http is None
        self.http = http or httpx.AsyncClient()
        specs = _Specs(_context(api_url, api_key, ingest_url, retry, timeout_s, headers))
        self.context = specs.ctx
        driver = AsyncDriver(self.http)
        self._driver, self._session = driver, specs.session
        self.triggers = AsyncTriggers(specs.triggers, driver)
        self.runs = AsyncRuns(specs.runs, driver)
        self.flows = AsyncFlows(specs.flows, driver)
        self.tenants = AsyncTenants(specs.tenants, driver)
        self.analytics = AsyncAnalytics(specs.analytics, driver)
        self.alerts = AsyncAlerts(specs.alerts, driver)
        self.connectors = AsyncConnectors(specs.connectors, driver)

    async def session(self) -> Session:
        return await self._driver.run(self._session.get())

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
