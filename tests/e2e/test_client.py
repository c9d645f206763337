"""The Python client (flowtrail.client, docs/client.md) against a real running Flowtrail: what a user of it notices.

A trigger sent twice with one Idempotency-Key names one run, also when the first answer is lost on the way back;
waiting gives the final status; listings yield every item exactly once across pages; a live stream yields the run's
events to its end; 429 and 503 answers are waited out as `Retry-After` says; errors carry the API's code and
request id; the blocking and the asyncio client behave the same.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web

from flowtrail.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    Conflict,
    FlowtrailConnectionError,
    NotFound,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from flowtrail.client.models import FlowPending, FlowWritten, StreamEvent
from schemas.events import CANONICAL_ENTITIES
from tests.conftest import Infra
from tests.harness import Env, also_running, connected, flow, flow_body, running

pytestmark = pytest.mark.e2e

TENANT = "tenant-a"
OPERATOR_KEY = "ft_op_" + "c" * 43
ECHO = [{"name": "echo", "action": "transform", "input": {"output": "{{ trigger }}"}}]
FAILING = [{"name": "check", "action": "transform", "input": {"output": {"ok": False}},
            "assertions": [{"expression": "ok", "expected": True}]}]  # fmt: skip
# Long enough to open a stream (or cancel) before it ends, short enough to wait for.
STEPPED = [{"name": "first", "action": "transform", "input": {"output": 1}},
           {"name": "pause", "action": "delay", "input": {"seconds": 1.5}},
           {"name": "last", "action": "transform", "input": {"output": "{{ trigger }}"}}]  # fmt: skip
ENTITY = CANONICAL_ENTITIES[0]
SLOW = [{"name": "wait", "action": "delay", "input": {"seconds": 60}}]
FLOWS = [flow(TENANT, "echo", ECHO), flow(TENANT, "paged", ECHO), flow(TENANT, "failing", FAILING),
         flow(TENANT, "stepped", STEPPED), flow(TENANT, "slow", SLOW), flow(TENANT, "keyed", ECHO),
         flow(TENANT, "watched", SLOW)]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with running(infra, tmp_path_factory, keys={"a": TENANT}, flows=FLOWS,
                       env={"FLOWTRAIL_API_OPERATOR_KEY": OPERATOR_KEY}) as env:  # fmt: skip
        yield env


@pytest.fixture
def client(env: Env) -> Iterator[Client]:
    with Client(env.url("api"), env.keys["a"], ingest_url=env.url("ingest")) as client:
        yield client


@pytest.fixture
async def aclient(env: Env) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(env.url("api"), env.keys["a"], ingest_url=env.url("ingest")) as client:
        yield client


# ---------------------------------------------------------------- triggers, waiting, idempotency (blocking client)


def test_a_key_sent_twice_names_one_run_and_wait_gives_the_final_status(client: Client) -> None:
    first = client.triggers.trigger("echo", {"n": 1}, idempotency_key="order-1")
    again = client.triggers.trigger("echo", {"n": 1}, idempotency_key="order-1")
    other = client.triggers.trigger("echo", {"n": 1})  # a new key each call: a new run
    assert first.run_id == again.run_id != other.run_id and first.status == "QUEUED"

    run = client.runs.wait(first.run_id, timeout_s=60)
    assert run.status == "SUCCEEDED" and run.steps[0].output == {"n": 1}
    assert [s.name for s in client.runs.steps(first.run_id)] == ["echo"]
    listed = {r.id for r in client.runs.iter(flow_id="echo", page_size=100)}
    assert first.run_id in listed and other.run_id in listed

    live = client.triggers.trigger_live("echo", {"n": 2})
    assert (live.status, live.output) == ("SUCCEEDED", {"n": 2})
    launched = client.triggers.launch("echo", {"n": 3})
    assert client.runs.wait(launched.run_id, timeout_s=60).trigger.payload == {"n": 3}

    done = client.triggers.trigger_and_wait("failing", timeout_s=60, manual=True)
    assert done.status == "FAILED" and done.trigger.type == "manual" and done.failed_step == "check"
    diagnosis = client.runs.diagnosis(done.id)
    assert diagnosis.failed and diagnosis.diagnosis is not None and diagnosis.diagnosis.step is not None
    assert diagnosis.diagnosis.step.name == "check"

    # A run still going when the wait ends: WaitTimeout with the run as last seen; the run goes on.
    slow = client.triggers.trigger("slow")
    with pytest.raises(WaitTimeout) as waited:
        client.runs.wait(slow.run_id, timeout_s=1)
    assert waited.value.run is not None and waited.value.run.status in {"QUEUED", "RUNNING"}
    assert client.runs.cancel(slow.run_id).status == "CANCEL_REQUESTED"
    assert client.runs.wait(slow.run_id, timeout_s=60).status == "CANCELED"


def test_errors_carry_the_apis_status_code_and_request_id(env: Env, client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        client.runs.get("run_does_not_exist")
    error = missing.value
    assert (error.status, error.code) == (404, "not_found") and "run_does_not_exist" in error.message
    assert error.request_id and error.method == "GET" and error.url.endswith("/v1/runs/run_does_not_exist")
    with pytest.raises(ValidationFailed) as invalid:
        client.triggers.trigger("echo", flow_version=99_999_999_999)
    assert invalid.value.code == "validation_error" and invalid.value.request_id
    with pytest.raises(NotFound):
        client.triggers.trigger("no-such-flow")
    finished = client.triggers.trigger_and_wait("echo", timeout_s=60)
    with pytest.raises(Conflict) as conflict:
        client.runs.cancel(finished.id)
    assert conflict.value.code == "conflict" and "already ended" in conflict.value.message
    with Client(env.url("api"), "ft_live_" + "x" * 43) as stranger, pytest.raises(Unauthorized) as refused:
        stranger.runs.list()
    assert refused.value.code == "unauthorized" and refused.value.request_id
    # Nothing listening: a connection error, retried for a GET (idempotent) until the policy's attempts end.
    policy = RetryPolicy(max_attempts=3, backoff_s=0.05)
    with Client("http://127.0.0.1:9", "k", retry=policy) as nowhere, pytest.raises(FlowtrailConnectionError) as down:
        nowhere.runs.list()
    assert down.value.attempts == 3 and down.value.status is None


# ---------------------------------------------------------------- listings across pages


async def test_paging_yields_every_run_exactly_once_sync_and_async(env: Env, aclient: AsyncClient) -> None:
    accepted = await aclient.triggers.trigger_many("paged", [{"i": i} for i in range(23)])
    assert accepted.count == 23
    final = [await aclient.runs.wait(run_id, timeout_s=90) for run_id in accepted.run_ids]
    assert {r.status for r in final} == {"SUCCEEDED"}

    seen = [r.id async for r in aclient.runs.iter(flow_id="paged", page_size=5)]
    assert len(seen) == 23 and set(seen) == set(accepted.run_ids)
    first = await aclient.runs.list(flow_id="paged", limit=5)
    assert len(first.data) == 5 and first.next_cursor is not None  # so the listing above did turn 5 pages

    def blocking() -> list[str]:
        with Client(env.url("api"), env.keys["a"]) as client:
            return [r.id for r in client.runs.iter(flow_id="paged", status="SUCCEEDED", page_size=4)]

    assert sorted(await asyncio.to_thread(blocking)) == sorted(seen)

    # A run's events page by seq: every one once, in order, equal to one big page.
    run_id = accepted.run_ids[0]
    paged = [e async for e in aclient.runs.iter_events(run_id, page_size=2)]
    whole = await aclient.runs.events(run_id)
    assert [e.seq for e in paged] == list(range(len(whole.data))) and paged == whole.data and len(paged) > 2


async def test_flows_and_tenants_are_written_read_and_listed_across_pages(env: Env) -> None:
    async with AsyncClient(env.url("api"), env.keys["a"]) as client:
        written = await client.flows.create(flow_body("made-by-client", "one", name="Made"))
        assert isinstance(written, FlowWritten | FlowPending) and written.version == 1
        await client.flows.wait_projected("made-by-client")
        second = await client.flows.publish("made-by-client", flow_body("made-by-client", "one", "two"))
        assert second.version == 2
        shown = await client.flows.wait_projected("made-by-client")
        while shown.latest_version < 2:
            await asyncio.sleep(0.1)
            shown = await client.flows.get("made-by-client")
        assert sorted(v.version for v in shown.versions) == [1, 2]
        assert (await client.flows.version("made-by-client", 1)).definition["steps"][0]["name"] == "one"
        flows = [f.id async for f in client.flows.iter(page_size=2)]
        assert sorted(flows) == sorted([f.id for f in FLOWS] + ["made-by-client"])

    async with AsyncClient(env.url("api"), OPERATOR_KEY) as operator:
        made = [await operator.tenants.create(f"Client Co {i}", id=f"client-co-{i}") for i in range(3)]
        assert all(t.admin_key.key.startswith("ft_live_") for t in made)
        listed = [t.id async for t in operator.tenants.iter(page_size=2)]
        assert len(listed) == len(set(listed)) and {"client-co-0", "client-co-1", "client-co-2", TENANT} <= set(listed)
        changed = await operator.tenants.update("client-co-1", metadata_days=30, payload_days=2)
        assert (changed.retention.metadata_days, changed.retention.payload_days) == (30, 2)
        with pytest.raises(ValidationFailed, match="payload_days"):
            await operator.tenants.update("client-co-1", metadata_days=1, payload_days=5)
    async with AsyncClient(env.url("api"), made[1].admin_key.key) as own:
        assert (await own.tenants.own()).retention.metadata_days == 30
        assert (await own.session()).tenant_id == "client-co-1"


# ---------------------------------------------------------------- live streams, actions, analytics


async def test_a_live_stream_yields_the_runs_events_to_its_end(env: Env, aclient: AsyncClient) -> None:
    accepted = await aclient.triggers.trigger("stepped", {"live": True})
    streamed = [e async for e in aclient.runs.stream(accepted.run_id)]
    assert all(isinstance(e, StreamEvent) for e in streamed)
    assert [e.seq for e in streamed] == list(range(len(streamed)))
    assert streamed[-1].type == "RunSucceeded"  # the stream ended by itself after the final status
    recorded = (await aclient.runs.events(accepted.run_id)).data
    assert [(e.seq, e.type) for e in streamed] == [(e.seq, e.type) for e in recorded]
    assert (await aclient.runs.get(accepted.run_id)).status == "SUCCEEDED"

    def blocking_from(after_seq: int) -> list[int]:
        with Client(env.url("api"), env.keys["a"]) as client:
            return [e.seq for e in client.runs.stream(accepted.run_id, after_seq=after_seq)]

    # Blocking, resumed after seq 2 of a run that ended: the rest, then the end.
    assert await asyncio.to_thread(blocking_from, 2) == [e.seq for e in streamed[3:]]


async def test_actions_retry_resume_bulk_and_analytics(env: Env, aclient: AsyncClient) -> None:
    failed = await aclient.triggers.trigger_and_wait("failing", timeout_s=60)
    retried = await aclient.runs.retry(failed.id, idempotency_key="retry-once")
    again = await aclient.runs.retry(failed.id, idempotency_key="retry-once")
    assert retried.run_id == again.run_id and retried.retry_of == failed.id
    assert (await aclient.runs.wait(retried.run_id, timeout_s=60)).retry_of == failed.id

    slow = await aclient.triggers.trigger("slow")
    await aclient.runs.wait(slow.run_id, timeout_s=60, statuses=["RUNNING"])
    dry = await aclient.runs.bulk_cancel(ids=[slow.run_id], dry_run=True)
    assert dry.dry_run and dry.count == 1 and dry.bulk_operation_id is None
    canceled = await aclient.runs.bulk_cancel(ids=[slow.run_id], reason="client test")
    assert canceled.count == 1 and canceled.bulk_operation_id
    assert (await aclient.runs.wait(slow.run_id, timeout_s=60)).status == "CANCELED"
    continued = await aclient.runs.resume(slow.run_id)  # a STOPPED run goes on as a new run
    assert continued.resumed == "continued" and continued.resumed_from == slow.run_id
    await aclient.runs.cancel(continued.run_id)

    echo = await aclient.analytics.flow("echo")
    assert echo.flow_id == "echo" and echo.runs >= 1 and echo.pass_rate == 1.0
    groups = await aclient.analytics.failure_groups(flow_id="failing")
    assert groups.data and groups.data[0].flow_id == "failing"
    flaky = await aclient.analytics.flakiness(flow_id="failing")
    assert all(step.flow_id == "failing" for step in flaky.data)


# ---------------------------------------------------------------- retries: real 429s, and a loopback proxy


async def test_a_real_429_is_waited_out_as_retry_after_says(env: Env, tmp_path_factory: pytest.TempPathFactory
                                                            ) -> None:  # fmt: skip
    limits = {"FLOWTRAIL_API_RATE_LIMIT_READS": "2", "FLOWTRAIL_API_RATE_LIMIT_WINDOW_S": "1"}
    async with also_running(env, tmp_path_factory, extra_env=limits) as limited:
        statuses: list[int] = []

        async def seen(response: httpx.Response) -> None:
            statuses.append(response.status_code)

        async with httpx.AsyncClient(event_hooks={"response": [seen]}) as http:
            async with AsyncClient(limited["api"].url, env.keys["a"], http=http) as client:
                pages = [await client.runs.list(limit=1) for _ in range(6)]
            assert len(pages) == 6 and statuses.count(429) >= 1 and statuses.count(200) == 6, statuses
            async with AsyncClient(limited["api"].url, env.keys["a"], http=http, retry=NO_RETRY) as client:
                with pytest.raises(RateLimited) as limited_error:
                    for _ in range(6):
                        await client.runs.list(limit=1)
        error = limited_error.value
        assert error.code == "rate_limited" and error.retry_after is not None and error.retry_after >= 1
        assert error.request_id


@asynccontextmanager
async def flaky_proxy(target: str, handle: Any) -> AsyncIterator[str]:
    """A loopback HTTP server in front of a real service: `handle(request, forward)` answers each request, where
    `forward()` passes it on to `target` and returns the real answer."""
    http = httpx.AsyncClient(timeout=30)

    async def serve(request: web.Request) -> web.StreamResponse:
        body = await request.read()

        async def forward() -> web.Response:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host", "content-length"}}
            r = await http.request(request.method, target + request.path_qs, headers=headers, content=body)
            return web.Response(body=r.content, status=r.status_code, content_type="application/json")

        return await handle(request, forward)  # type: ignore[no-any-return]

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await http.aclose()


def _unavailable(retry_after: str) -> web.Response:
    error = {"error": {"code": "kafka_unavailable", "message": "try again", "request_id": "req_proxy"}}
    return web.json_response(error, status=503, headers={"Retry-After": retry_after})


async def test_503_with_retry_after_is_retried_and_a_lost_answer_names_the_same_run(env: Env) -> None:
    calls: list[str] = []

    async def first_unavailable(request: web.Request, forward: Any) -> web.StreamResponse:
        calls.append(request.method)
        return _unavailable("1") if len(calls) == 1 else await forward()

    async with flaky_proxy(env.url("api"), first_unavailable) as url, AsyncClient(url, env.keys["a"]) as client:
        started = time.monotonic()
        page = await client.runs.list(flow_id="echo", limit=1)
        assert len(calls) == 2 and time.monotonic() - started >= 1.0 and page.data  # waited Retry-After, then read

    # Retry-After as an HTTP date is honoured too.
    calls.clear()

    async def first_unavailable_until(request: web.Request, forward: Any) -> web.StreamResponse:
        calls.append(request.method)
        when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
        return _unavailable(when) if len(calls) == 1 else await forward()

    async with flaky_proxy(env.url("api"), first_unavailable_until) as url, AsyncClient(url, env.keys["a"]) as client:
        started = time.monotonic()
        assert (await client.runs.list(flow_id="echo", limit=1)).data
        assert len(calls) == 2 and time.monotonic() - started >= 1.0

    # Retry-After beyond the policy's total time: no wait, the 503 raised with what the API asked.
    async def always(request: web.Request, forward: Any) -> web.StreamResponse:
        return _unavailable("120")

    async with flaky_proxy(env.url("api"), always) as url, AsyncClient(url, env.keys["a"]) as client:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as gave_up:
            await client.runs.list()
        assert time.monotonic() - started < 5 and gave_up.value.retry_after == 120 and gave_up.value.attempts == 1
        assert (gave_up.value.code, gave_up.value.request_id) == ("kafka_unavailable", "req_proxy")

    # The first trigger reaches ingest, but its answer is lost (the connection drops): the client sends it again
    # with the same Idempotency-Key, and the answer names the run the first one started. One run, not two.
    sent: list[str] = []

    async def answer_lost_once(request: web.Request, forward: Any) -> web.StreamResponse:
        sent.append(request.headers["Idempotency-Key"])
        answer = await forward()
        if len(sent) == 1:
            assert request.transport is not None
            request.transport.close()
        return answer

    async with flaky_proxy(env.url("ingest"), answer_lost_once) as url:
        policy = RetryPolicy(backoff_s=0.05)
        async with AsyncClient(env.url("api"), env.keys["a"], ingest_url=url, retry=policy) as client:
            accepted = await client.triggers.trigger("keyed", {"once": True})
            assert len(sent) == 2 and sent[0] == sent[1]
            await client.runs.wait(accepted.run_id, timeout_s=60)
            runs = [r async for r in client.runs.iter(flow_id="keyed")]
            assert [r.id for r in runs] == [accepted.run_id]

    # The blocking client retries the same way (a 503, then the real answer).
    calls.clear()

    def blocking(url: str) -> int:
        with Client(url, env.keys["a"]) as client:
            return len(client.runs.list(flow_id="echo", limit=1).data)

    async with flaky_proxy(env.url("api"), first_unavailable) as url:
        assert await asyncio.to_thread(blocking, url) == 1 and len(calls) == 2


async def test_a_stream_cut_mid_way_resumes_after_the_last_event_seen(env: Env) -> None:
    """The proxy passes the real event stream on, and the first time cuts the connection after two events: the
    client opens it again with Last-Event-ID and the caller sees every event once."""
    asked: list[str | None] = []
    http = httpx.AsyncClient(timeout=30)

    async def cut_once(request: web.Request, forward: Any) -> web.StreamResponse:
        asked.append(request.headers.get("Last-Event-ID"))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host"}}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = 0
        async with http.stream("GET", env.url("api") + request.path_qs, headers=headers) as upstream:
            async for line in upstream.aiter_lines():
                await response.write(line.encode() + b"\n")
                events += line == ""
                if len(asked) == 1 and events == 2:
                    assert request.transport is not None
                    request.transport.close()
                    return response
        await response.write_eof()
        return response

    async with AsyncClient(env.url("api"), env.keys["a"]) as client:
        accepted = await client.triggers.trigger("stepped", {"cut": True})
        run = await client.runs.wait(accepted.run_id, timeout_s=60)
        async with flaky_proxy(env.url("api"), cut_once) as url:
            async with AsyncClient(url, env.keys["a"], retry=RetryPolicy(backoff_s=0.05)) as through:
                streamed = [e.seq async for e in through.runs.stream(run.id)]
        recorded = [e.seq for e in (await client.runs.events(run.id)).data]
    await http.aclose()
    assert streamed == recorded and len(streamed) > 2
    assert asked == [None, "1"]  # the second request resumed after seq 1, the last event the first one gave


async def test_watch_follows_the_tenants_status_changes_as_they_happen(env: Env, aclient: AsyncClient) -> None:
    seen: dict[str, list[str]] = {}
    # The feed starts when it is first read, so it is asked to start from before the trigger (its cursor form).
    since = datetime.now(UTC) - timedelta(seconds=1)
    accepted = await aclient.triggers.trigger("watched")
    async with aclosing(aclient.runs.watch(flow_id="watched", last_event_id=f"{since.isoformat()}|")) as changes:
        async with asyncio.timeout(60):
            async for run in changes:
                seen.setdefault(run.id, []).append(run.status)
                if run.id == accepted.run_id and run.status == "RUNNING":
                    await aclient.runs.cancel(run.id)  # seen live: it would run for a minute otherwise
                if run.id == accepted.run_id and run.status == "CANCELED":
                    break
    assert seen == {accepted.run_id: [*seen[accepted.run_id][:-2], "RUNNING", "CANCELED"]}, seen


async def test_canonical_records_are_listed_across_pages(env: Env, aclient: AsyncClient) -> None:
    """Records as the projector keeps them (written here straight into the read model), read through the API."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    async with connected(env) as db:
        for i in range(5):
            at = start + timedelta(minutes=i)
            await db.execute(
                "INSERT INTO canonical_records (tenant_id, environment, entity, canonical_id, external_ids, data, "
                "created_at, updated_at, last_run_id) VALUES ($1, 'PRODUCTION', $2, $3, $4, $5, $6, $6, 'run_x')",
                TENANT, ENTITY, f"c{i}", {"shop": str(i)}, {"email": f"{i}@example.com", "name": f"N{i}"}, at,
            )  # fmt: skip
    records = [r async for r in aclient.data.iter(ENTITY, page_size=2)]
    assert [r.canonical_id for r in records] == ["c0", "c1", "c2", "c3", "c4"]  # oldest update first, once each
    assert records[3].model_extra == {"email": "3@example.com", "name": "N3"}
    later = [r async for r in aclient.data.iter(ENTITY, updated_since=start + timedelta(minutes=3), fields=["email"])]
    assert [(r.canonical_id, r.model_extra) for r in later] == [("c3", {"email": "3@example.com"}),
                                                                 ("c4", {"email": "4@example.com"})]  # fmt: skip
    assert (await aclient.data.get(ENTITY, "c1")).external_ids == {"shop": "1"}
