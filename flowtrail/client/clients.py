"""`Client` (blocking) and `AsyncClient` (asyncio) over one set of calls (flowtrail/client/api.py): each resource
names the calls it offers once, and the client's driver runs them, blocking or awaited (docs/client.md)."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, overload

import httpx

from flowtrail.client import api
from flowtrail.client.drivers import AsyncDriver, SyncDriver
from flowtrail.client.plan import Context, Items, Plan, RetryPolicy

P = ParamSpec("P")
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
D = TypeVar("D", bound=SyncDriver | AsyncDriver)

DEFAULT_API_URL = "http://127.0.0.1:8000"
USER_AGENT = "flowtrail-client"


class _Resource(Generic[D]):
    def __init__(self, spec: Any, driver: D) -> None:
        self._spec = spec
        self._driver: D = driver


class _Call(Generic[P, T]):
    """A call of a resource: its plan run by the client's driver, so `T` (Client) or an awaitable of it
    (AsyncClient)."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Plan[T]]) -> None:
        self.fn = fn

    @overload
    def __get__(self, obj: _Resource[SyncDriver], owner: Any) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: _Resource[AsyncDriver], owner: Any) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, obj: Any, owner: Any) -> Any:
        if obj is None:
            return self
        fn, spec, driver = self.fn, obj._spec, obj._driver
        if isinstance(driver, AsyncDriver):

            async def awaited(*args: Any, **kwargs: Any) -> Any:
                return await driver.run(fn(spec, *args, **kwargs))

            return functools.wraps(fn)(awaited)
        return functools.wraps(fn)(lambda *args, **kwargs: driver.run(fn(spec, *args, **kwargs)))


class _Listing(Generic[P, I]):
    """A listing or stream of a resource: an iterator (Client) or an async iterator (AsyncClient) of `I`."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Items[I]]) -> None:
        self.fn = fn

    @overload
    def __get__(self, obj: _Resource[SyncDriver], owner: Any) -> Callable[P, Iterator[I]]: ...
    @overload
    def __get__(self, obj: _Resource[AsyncDriver], owner: Any) -> Callable[P, AsyncIterator[I]]: ...
    def __get__(self, obj: Any, owner: Any) -> Any:
        if obj is None:
            return self
        fn, spec, driver = self.fn, obj._spec, obj._driver
        return functools.wraps(fn)(lambda *args, **kwargs: driver.iterate(fn(spec, *args, **kwargs)))


class Triggers(_Resource[D]):
    __doc__ = api.TriggersApi.__doc__
    trigger = _Call(api.TriggersApi.trigger)
    trigger_many = _Call(api.TriggersApi.trigger_many)
    trigger_live = _Call(api.TriggersApi.trigger_live)
    trigger_and_wait = _Call(api.TriggersApi.trigger_and_wait)
    launch = _Call(api.TriggersApi.launch)
    launch_many = _Call(api.TriggersApi.launch_many)
    launch_live = _Call(api.TriggersApi.launch_live)


class Runs(_Resource[D]):
    __doc__ = api.RunsApi.__doc__
    get = _Call(api.RunsApi.get)
    steps = _Call(api.RunsApi.steps)
    list = _Call(api.RunsApi.list)
    iter = _Listing(api.RunsApi.iter)
    events = _Call(api.RunsApi.events)
    iter_events = _Listing(api.RunsApi.iter_events)
    logs = _Call(api.RunsApi.logs)
    iter_logs = _Listing(api.RunsApi.iter_logs)
    iter_record_errors = _Listing(api.RunsApi.iter_record_errors)
    diagnosis = _Call(api.RunsApi.diagnosis)
    stream = _Listing(api.RunsApi.stream)
    watch = _Listing(api.RunsApi.watch)
    wait = _Call(api.RunsApi.wait)
    retry = _Call(api.RunsApi.retry)
    cancel = _Call(api.RunsApi.cancel)
    resume = _Call(api.RunsApi.resume)
    archive = _Call(api.RunsApi.archive)
    bulk_retry = _Call(api.RunsApi.bulk_retry)
    bulk_cancel = _Call(api.RunsApi.bulk_cancel)
    bulk_archive = _Call(api.RunsApi.bulk_archive)


class Flows(_Resource[D]):
    __doc__ = api.FlowsApi.__doc__
    list = _Call(api.FlowsApi.list)
    iter = _Listing(api.FlowsApi.iter)
    get = _Call(api.FlowsApi.get)
    version = _Call(api.FlowsApi.version)
    create = _Call(api.FlowsApi.create)
    publish = _Call(api.FlowsApi.publish)
    pause = _Call(api.FlowsApi.pause)
    resume = _Call(api.FlowsApi.resume)
    wait_projected = _Call(api.FlowsApi.wait_projected)


class Tenants(_Resource[D]):
    __doc__ = api.TenantsApi.__doc__
    create = _Call(api.TenantsApi.create)
    list = _Call(api.TenantsApi.list)
    iter = _Listing(api.TenantsApi.iter)
    get = _Call(api.TenantsApi.get)
    update = _Call(api.TenantsApi.update)
    own = _Call(api.TenantsApi.own)


class Analytics(_Resource[D]):
    __doc__ = api.AnalyticsApi.__doc__
    flow = _Call(api.AnalyticsApi.flow)
    flakiness = _Call(api.AnalyticsApi.flakiness)
    failure_groups = _Call(api.AnalyticsApi.failure_groups)
    endpoints = _Call(api.AnalyticsApi.endpoints)


class Alerts(_Resource[D]):
    iter = _Listing(api.AlertsApi.iter)
    get = _Call(api.AlertsApi.get)


class Connectors(_Resource[D]):
    iter = _Listing(api.ConnectorsApi.iter)
    get = _Call(api.ConnectorsApi.get)


class Data(_Resource[D]):
    __doc__ = api.DataApi.__doc__
    iter = _Listing(api.DataApi.iter)
    get = _Call(api.DataApi.get)


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


class _Client(_Resource[D]):
    """What both clients hold: the context, the driver and a resource per area (`session` is the key's own)."""

    session = _Call(api.SessionApi.get)

    def __init__(self, ctx: Context, driver: D) -> None:
        super().__init__(api.SessionApi(ctx), driver)
        self.context = ctx
        self.triggers: Triggers[D] = Triggers(api.TriggersApi(ctx), driver)
        self.runs: Runs[D] = Runs(api.RunsApi(ctx), driver)
        self.flows: Flows[D] = Flows(api.FlowsApi(ctx), driver)
        self.tenants: Tenants[D] = Tenants(api.TenantsApi(ctx), driver)
        self.analytics: Analytics[D] = Analytics(api.AnalyticsApi(ctx), driver)
        self.alerts: Alerts[D] = Alerts(api.AlertsApi(ctx), driver)
        self.connectors: Connectors[D] = Connectors(api.ConnectorsApi(ctx), driver)
        self.data: Data[D] = Data(api.DataApi(ctx), driver)


class Client(_Client[SyncDriver]):
    """Flowtrail's API, blocking. `Client(api_url, api_key)`, or from FLOWTRAIL_API_URL and FLOWTRAIL_API_KEY;
    `ingest_url` (FLOWTRAIL_INGEST_URL) takes the triggers. Close it, or use it as a context manager."""

    def __init__(self, api_url: str | None = None, api_key: str | None = None, *, ingest_url: str | None = None,
                 retry: RetryPolicy | None = None, timeout_s: float = 30.0, headers: Mapping[str, str] | None = None,
                 http: httpx.Client | None = None) -> None:  # fmt: skip
        self._own_http = http is None
        self.http = http or httpx.Client()
        super().__init__(_context(api_url, api_key, ingest_url, retry, timeout_s, headers), SyncDriver(self.http))

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Client[AsyncDriver]):
    """Flowtrail's API with asyncio: as `Client`, every call awaited and every listing or stream an async
    iterator. Close it (`await client.aclose()`), or use it as an async context manager."""

    def __init__(self, api_url: str | None = None, api_key: str | None = None, *, ingest_url: str | None = None,
                 retry: RetryPolicy | None = None, timeout_s: float = 30.0, headers: Mapping[str, str] | None = None,
                 http: httpx.AsyncClient | None = None) -> None:  # fmt: skip
        self._own_http = http is None
        self.http = http or httpx.AsyncClient()
        super().__init__(_context(api_url, api_key, ingest_url, retry, timeout_s, headers), AsyncDriver(self.http))

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
