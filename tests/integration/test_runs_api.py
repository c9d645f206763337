"""GET /v1/runs on real processes: every filter against a known workload, and cursor pages in both
directions while new runs keep arriving."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas import events as ev
from schemas.events import EventBase, TriggerInfo
from tests.conftest import Infra
from tests.harness import Env, KeySpec, append_ledger, connected, keep_history_of, running, wait_projected

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
TRIGGERS = ("api", "webhook", "schedule")


@dataclass(frozen=True)
class Spec:
    """What one run is; the expected answer of every filter is computed from these."""

    id: str
    tenant: str
    flow: str
    created: datetime
    trigger: str
    mode: str
    caller: str
    environment: str
    tags: tuple[str, ...]
    failed: bool
    archived: bool

    @property
    def status(self) -> str:
        return "FAILED" if self.failed else "SUCCEEDED"


def spec(i: int, tenant: str = "tenant-a") -> Spec:
    return Spec(
        id=f"run_{tenant[-1]}{i:04d}", tenant=tenant, flow=f"f{i % 3 + 1}", created=T0 + timedelta(minutes=i),
        trigger=TRIGGERS[i % 3], mode="live" if i % 4 == 1 else "async", caller=f"key_{i % 2 + 1}",
        environment="TESTING" if i % 10 == 9 else "PRODUCTION", tags=("nightly",) if i % 4 == 0 else (),
        failed=i % 5 == 2, archived=i == 30,
    )  # fmt: skip


def events_of(s: Spec) -> list[EventBase]:
    out: list[EventBase] = []

    def emit(cls: Any, **payload: Any) -> None:
        seq = len(out)
        out.append(cls(tenant_id=s.tenant, run_id=s.id, flow_id=s.flow, flow_version=1, seq=seq,
                       occurred_at=s.created + timedelta(seconds=seq), causation_id=f"{s.id}:{seq}",
                       correlation_id=s.id, payload=payload))  # fmt: skip

    emit(ev.RunRequested, trigger=TriggerInfo(type=s.trigger, caller=s.caller, payload={}), environment=s.environment,
         execution_mode=s.mode, tags=s.tags, flow_name=s.flow.upper())  # fmt: skip
    emit(ev.RunQueued)
    emit(ev.RunStarted)
    for step in ("fetch", "push"):
        emit(ev.StepStarted, step=step, position=("fetch", "push").index(step), action="transform", input={})
        if step == "push" and s.failed:
            error = {"category": "CONFLICT", "message": f"duplicate order {s.id[-4:]} at destination"}
            emit(ev.StepFailed, step=step, error=error)
            emit(ev.RunFailed, duration_ms=2000.0, failed_step=step, error=error)
            break
        emit(ev.StepSucceeded, step=step, output={})
    else:
        emit(ev.RunSucceeded, duration_ms=2000.0)
    if s.archived:
        emit(ev.RunArchived)
    return out


SPECS = [spec(i) for i in range(60)] + [spec(i, "tenant-b") for i in range(5)]


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {
        "live": "tenant-a",
        "test": KeySpec("tenant-a", environment="TESTING"),
        "writer": KeySpec("tenant-a", scopes=("runs:write",)),
        "other": "tenant-b",
    }
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api")) as env:
        await keep_history_of(env, "tenant-a", "tenant-b")
        events = [e for s in SPECS for e in events_of(s)]
        await append_ledger(env.sandbox, events)
        await wait_projected(env, len(events))
        yield env


async def get(env: Env, path: str, key: str = "live", **params: Any) -> httpx.Response:
    return await env.api("GET", path, key, params=params)


async def ids(env: Env, key: str = "live", **params: Any) -> list[str]:
    r = await get(env, "/v1/runs", key, limit=100, **params)
    assert r.status_code == 200, r.text
    return [run["id"] for run in r.json()["data"]]


def expected(keep: Callable[[Spec], bool], tenant: str = "tenant-a", environment: str = "PRODUCTION",
             archived: bool = False) -> list[str]:  # fmt: skip
    chosen = [s for s in SPECS if s.tenant == tenant and s.environment == environment and (archived or not s.archived)]
    return [s.id for s in sorted(chosen, key=lambda s: s.created, reverse=True) if keep(s)]


async def test_default_list_is_the_newest_twenty_of_the_keys_tenant_and_environment(env: Env) -> None:
    r = await get(env, "/v1/runs")
    assert r.status_code == 200
    assert [run["id"] for run in r.json()["data"]] == expected(lambda s: True)[:20]
    assert await ids(env, "other") == expected(lambda s: True, tenant="tenant-b")
    assert await ids(env, "test") == expected(lambda s: True, environment="TESTING")


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"flow_id": "f2"}, lambda s: s.flow == "f2"),
        ({"flow_id": ["f1", "f3"]}, lambda s: s.flow in ("f1", "f3")),
        ({"flow_id": "f1,f3"}, lambda s: s.flow in ("f1", "f3")),
        ({"status": "FAILED"}, lambda s: s.failed),
        ({"status": ["failed", "succeeded"]}, lambda s: True),
        ({"status": "error"}, lambda s: s.failed),  # a seed alias
        ({"status": "successful,timeout"}, lambda s: not s.failed),
        ({"trigger_type": "webhook"}, lambda s: s.trigger == "webhook"),
        ({"trigger_type": "api,schedule"}, lambda s: s.trigger in ("api", "schedule")),
        ({"execution_mode": "live"}, lambda s: s.mode == "live"),
        ({"caller": "key_2"}, lambda s: s.caller == "key_2"),
        ({"tags": "nightly"}, lambda s: "nightly" in s.tags),
        ({"failed_step": "push"}, lambda s: s.failed),
        ({"failed_step": "fetch"}, lambda s: False),
        ({"from": (T0 + timedelta(minutes=20)).isoformat()}, lambda s: s.created >= T0 + timedelta(minutes=20)),
        ({"to": (T0 + timedelta(minutes=20)).isoformat()}, lambda s: s.created < T0 + timedelta(minutes=20)),
        (
            {
                "created_after": (T0 + timedelta(minutes=10)).isoformat(),
                "created_before": (T0 + timedelta(minutes=25)).isoformat(),
            },
            lambda s: T0 + timedelta(minutes=10) <= s.created < T0 + timedelta(minutes=25),
        ),
        ({"ids": "run_a0003,run_a0007,run_b0001"}, lambda s: s.id in ("run_a0003", "run_a0007")),
        ({"q": "duplicate order 0012"}, lambda s: s.id == "run_a0012"),
        ({"q": "a004"}, lambda s: s.id.startswith("run_a004")),
        (
            {"flow_id": "f3", "status": "FAILED", "trigger_type": "schedule"},
            lambda s: s.flow == "f3" and s.failed and s.trigger == "schedule",
        ),
    ],
    ids=lambda p: str(p) if isinstance(p, dict) else "",
)
async def test_filter(env: Env, params: dict[str, Any], keep: Callable[[Spec], bool]) -> None:
    want = expected(keep)
    assert await ids(env, **params) == want
    assert want or params.get("failed_step") == "fetch"  # every case but one selects something


async def test_archived_runs_are_hidden_unless_asked_for(env: Env) -> None:
    assert "run_a0030" not in await ids(env)
    with_archived = await ids(env, include_archived="true")
    assert with_archived == expected(lambda s: True, archived=True)
    assert "run_a0030" in with_archived


async def test_environment_filter_and_key_environment(env: Env) -> None:
    assert await ids(env, "test", environment="TESTING") == expected(lambda s: True, environment="TESTING")
    r = await get(env, "/v1/runs", "live", environment="TESTING")
    assert r.status_code == 403 and "PRODUCTION" in r.json()["error"]["message"]
    # A test key cannot read a live run by id either.
    assert (await get(env, "/v1/runs/run_a0000", "test")).status_code == 404


async def test_bad_parameters_and_keys_get_the_error_envelope(env: Env) -> None:
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("live", {"limit": 0}, 422, "validation_error"),
        ("live", {"limit": 101}, 422, "validation_error"),
        ("live", {"status": "bogus"}, 422, "validation_error"),
        ("live", {"trigger_type": "pigeon"}, 422, "validation_error"),
        ("live", {"from": "yesterday"}, 422, "validation_error"),
        ("live", {"from": T0.isoformat(), "created_after": T0.isoformat()}, 422, "validation_error"),
        ("live", {"cursor": "not-a-cursor"}, 400, "invalid_request"),
        ("live", {"cursor": "abc", "offset": 5}, 422, "validation_error"),
        ("writer", {}, 403, "forbidden"),
    ]
    for key, params, status, code in cases:
        r = await get(env, "/v1/runs", key, **params)
        assert r.status_code == status, (params, r.text)
        body = r.json()["error"]
        assert body["code"] == code and body["message"] and body["request_id"], body
    for headers in ({}, {"Authorization": "Bearer ft_live_garbage"}, {"Authorization": "Basic x"}):
        r = await env.http.get(env.url("api") + "/v1/runs", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def _walk(env: Env, cursor_key: str, start: dict[str, Any]) -> list[list[str]]:
    pages: list[list[str]] = []
    body = start
    while True:
        pages.append([run["id"] for run in body["data"]])
        cursor = body[cursor_key]
        if cursor is None:
            return pages
        r = await get(env, "/v1/runs", limit=7, cursor=cursor)
        assert r.status_code == 200, r.text
        body = r.json()


async def test_cursor_pages_forward_then_all_the_way_back(env: Env) -> None:
    first = (await get(env, "/v1/runs", limit=7)).json()
    assert first["prev_cursor"] is None
    forward = await _walk(env, "next_cursor", first)
    assert [i for page in forward for i in page] == expected(lambda s: True)
    assert all(len(page) == 7 for page in forward[:-1])
    last = (await get(env, "/v1/runs", limit=7, cursor=(await _last_cursor(env)))).json()
    backward = await _walk(env, "prev_cursor", last)
    assert [i for page in reversed(backward) for i in page] == expected(lambda s: True)


async def _last_cursor(env: Env) -> str:
    """The next_cursor that leads to the last page."""
    body = (await get(env, "/v1/runs", limit=7)).json()
    cursor = None
    while body["next_cursor"] is not None:
        cursor = body["next_cursor"]
        body = (await get(env, "/v1/runs", limit=7, cursor=cursor)).json()
    assert cursor is not None
    return cursor


async def test_pages_stay_stable_while_new_runs_arrive(env: Env) -> None:
    first = (await get(env, "/v1/runs", limit=5)).json()
    second = (await get(env, "/v1/runs", limit=5, cursor=first["next_cursor"])).json()
    seen = [run["id"] for run in first["data"] + second["data"]]
    # Ten runs newer than everything arrive between page requests.
    fresh = [Spec(**{**vars(spec(100 + i)), "environment": "PRODUCTION", "archived": False}) for i in range(10)]
    events = [e for s in fresh for e in events_of(s)]
    async with connected(env) as db:
        done = await db.fetchval("SELECT coalesce(sum(next_offset), 0) FROM projector_offsets")
    await append_ledger(env.sandbox, events)
    await wait_projected(env, done + len(events))
    old = expected(lambda s: True)
    arrived = [s.id for s in sorted(fresh, key=lambda s: s.created, reverse=True)]
    # Forward: the old runs continue exactly where the second page ended, none twice, none missed.
    rest = await _walk(env, "next_cursor", (await get(env, "/v1/runs", limit=7, cursor=second["next_cursor"])).json())
    assert seen + [i for page in rest for i in page] == old
    # Backward from the second page: the first page's runs, then the ones that arrived, up to the new top.
    back = await _walk(env, "prev_cursor", (await get(env, "/v1/runs", limit=7, cursor=second["prev_cursor"])).json())
    assert [i for page in reversed(back) for i in page] == arrived + old[:5]
    top = await get(env, "/v1/runs", limit=10)
    assert [run["id"] for run in top.json()["data"]] == arrived
