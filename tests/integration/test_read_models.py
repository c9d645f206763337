"""Detail read models and analytics, from ledger events produced straight to Kafka, read through the API.

Covers what a user sees on a run page (attempts with retry times, records counters, record errors with
field paths, logs by level, duration breakdown, the run as it stood at an earlier seq or time), the
runs list's `q` search, `sort` and `offset`, and the analytics built from the same events: failure
groups, flakiness, pass rate and duration percentiles, endpoint coverage. Every event is delivered
twice; counters must not double.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas import events as ev
from schemas.events import EventBase, TriggerInfo
from tests.conftest import Infra
from tests.harness import Env, append_ledger, flow, keep_history_of, running, wait_projected

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


class Run:
    """Writes one run's events the way the executor would, 100 ms apart."""

    def __init__(self, run_id: str, flow_id: str, start: datetime, flow_version: int = 1) -> None:
        self.run_id, self.flow_id, self.start, self.flow_version = run_id, flow_id, start, flow_version
        self.events: list[EventBase] = []

    @property
    def now(self) -> datetime:
        return self.start + timedelta(milliseconds=100 * len(self.events))

    def emit(self, cls: Any, **payload: Any) -> Run:
        seq = len(self.events)
        self.events.append(cls(
            tenant_id="acme", run_id=self.run_id, flow_id=self.flow_id, flow_version=self.flow_version, seq=seq,
            occurred_at=self.now, causation_id=f"{self.run_id}:{seq}", correlation_id=self.run_id, payload=payload,
        ))  # fmt: skip
        return self

    def begin(self, payload: Any = None, window: dict[str, Any] | None = None) -> Run:
        trigger = TriggerInfo(type="webhook", caller="key_hook", payload=payload or {})
        self.emit(ev.RunRequested, trigger=trigger, flow_name=self.flow_id).emit(ev.RunQueued)
        return self.emit(ev.RunStarted, **({"cursor_window": window} if window else {}))

    def step(self, name: str, position: int, action: str = "transform", step_input: Any = None,
             ok: bool = True, duration_ms: float = 10.0) -> Run:  # fmt: skip
        self.emit(ev.StepStarted, step=name, position=position, action=action, input=step_input or {})
        if ok:
            return self.emit(ev.StepSucceeded, step=name, output={"ok": True}, duration_ms=duration_ms)
        error = {"category": "VALIDATION", "message": f"{name} rejected"}
        return self.emit(ev.StepFailed, step=name, error=error, duration_ms=duration_ms)


def live_window(run: Run) -> Any:
    started = next(e for e in run.events if e.type == "RunStarted")
    return started.payload.cursor_window.model_dump(mode="json")


def _runs() -> list[Run]:
    runs: list[Run] = []
    # A sync run: a GET that fails twice (TRANSIENT, retried), a transform, a POST, records counted, two
    # rejected records, logs at three levels; it ends PARTIAL.
    window = {"updated_since": "2026-11-19T09:00:00Z", "updated_until": "2026-11-20T09:00:00Z"}
    sync = Run("run_sync_0001", "sync", T0).begin({"since": "2026-11-19"}, window=window)
    get = {"method": "GET", "url": "https://crm.example.com/v2/contacts/48213?page=2"}
    sync.emit(ev.StepStarted, step="read", position=0, action="http_request", input=get, attempt=1)
    unavailable = {"category": "TRANSIENT", "message": "503 from crm"}
    retry_at = T0 + timedelta(seconds=1)
    sync.emit(ev.StepAttemptFailed, step="read", attempt=1, duration_ms=30, error=unavailable, retry_at=retry_at,
              output={"status": 503, "body": "crm is busy"})  # fmt: skip
    sync.emit(ev.StepStarted, step="read", position=0, action="http_request", input=get, attempt=2)
    sync.emit(ev.StepSucceeded, step="read", attempt=2, output={"status": 200}, duration_ms=40)
    sync.emit(ev.LogEmitted, level="INFO", message="read 5 contacts", step="read")
    sync.step("map", 1, duration_ms=5)
    sync.emit(ev.LogEmitted, level="WARNING", message="contact 7 has no email", step="map", fields={"contact": 7})
    post = {"method": "POST", "url": "https://erp.example.com/api/customers"}
    sync.step("write", 2, action="http_request", step_input=post, duration_ms=60)
    sync.emit(ev.RecordsProcessed, step="write", read=5, transformed=5, written=3, skipped=0, failed=2)
    sync.emit(ev.RecordFailed, step="write", record_key="contact-7", field_path="email",
              error="email is required", raw_error={"code": "E_REQUIRED", "field": "email"})  # fmt: skip
    sync.emit(ev.RecordFailed, step="write", record_key="contact-9", field_path="address.zip",
              error="zip must be 5 digits", raw_error={"code": "E_FORMAT"})  # fmt: skip
    sync.emit(ev.LogEmitted, level="ERROR", message="2 records rejected", step="write")
    sync.emit(ev.RunPartiallySucceeded, duration_ms=1500.0)
    runs.append(sync)

    # "orders": 6 runs; the `push` step fails on 3 of them with messages that differ only in ids and
    # numbers (one failure group), passes on the rest (flaky). Durations 100, 200, ... 600 ms.
    for i in range(6):
        r = Run(f"run_order_{i:04d}", "orders", T0 + timedelta(minutes=10 + i)).begin({"order": i})
        order_url = f"https://shop.example.com/orders/{1000 + i}"
        r.step("fetch", 0, action="http_request", step_input={"method": "GET", "url": order_url})
        if i % 2 == 0:
            error = {"category": "AUTH", "message": f"token for account {7000 + i} expired at step push (req_{i}abc)"}
            r.emit(ev.StepStarted, step="push", position=1, action="transform", input={})
            r.emit(ev.StepFailed, step="push", error=error, duration_ms=5)
            r.emit(ev.RunFailed, duration_ms=100.0 * (i + 1), failed_step="push", error=error)
        else:
            r.step("push", 1)
            r.emit(ev.RunSucceeded, duration_ms=100.0 * (i + 1))
        runs.append(r)
    # One rare error message to search for.
    rare = Run("run_rare_0001", "orders", T0 + timedelta(minutes=30)).begin()
    error = {"category": "VALIDATION", "message": "currency XQZ is not supported by the ledger"}
    rare.emit(ev.StepStarted, step="fetch", position=0, action="transform", input={})
    rare.emit(ev.StepFailed, step="fetch", error=error, duration_ms=1)
    rare.emit(ev.RunFailed, duration_ms=50.0, failed_step="fetch", error=error)
    runs.append(rare)
    # Still running: no duration yet.
    runs.append(Run("run_live_0001", "orders", T0 + timedelta(minutes=40)).begin().emit(
        ev.StepStarted, step="fetch", position=0, action="transform", input={}))  # fmt: skip
    return runs


RUNS = _runs()
EVENTS = [e for r in RUNS for e in r.events]


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    # The flows the runs belong to (analytics answers 404 for a flow that does not exist).
    flows = [flow("acme", flow_id, [{"name": "only", "action": "transform", "input": {"output": {}}}], name=flow_id)
             for flow_id in ("orders", "sync")]  # fmt: skip
    async with running(infra, tmp_path_factory, keys={"a": "acme"}, flows=flows, services=("projector", "api")) as env:
        await keep_history_of(env, "acme")
        # Every event twice: Kafka redelivery must not double any counter.
        await append_ledger(env.sandbox, EVENTS + EVENTS)
        await wait_projected(env, len(flows) + 2 * len(EVENTS), within=60)
        yield env


async def get(env: Env, path: str, **params: Any) -> httpx.Response:
    return await env.api("GET", path, params=params)


async def ok(env: Env, path: str, **params: Any) -> Any:
    """The answer of a GET that must succeed."""
    return await env.ok("GET", path, params=params)


async def test_run_detail_shows_attempts_records_errors_and_breakdown(env: Env) -> None:
    run = await ok(env, "/v1/runs/run_sync_0001")
    assert run["status"] == "PARTIAL"
    assert run["trigger"] == {"type": "webhook", "caller": "key_hook", "payload": {"since": "2026-11-19"}}
    assert run["cursor_window"] == {"updated_since": "2026-11-19T09:00:00Z", "updated_until": "2026-11-20T09:00:00Z"}
    assert run["records"] == {"read": 5, "transformed": 5, "written": 3, "deduped": 0, "skipped": 0, "failed": 2}
    read = run["steps"][0]
    assert read["name"] == "read" and read["attempt"] == 2 and read["status"] == "SUCCEEDED"
    first, second = read["attempts"]
    assert first["status"] == "FAILED" and first["error"]["category"] == "TRANSIENT"
    assert first["retry_at"] == "2026-11-20T09:00:01Z"
    assert second["status"] == "SUCCEEDED" and second["duration_ms"] == 40
    # Each attempt keeps what the upstream answered: the 503's body too, not only the last attempt's output.
    assert first["output"] == {"status": 503, "body": "crm is busy"} and second["output"] == {"status": 200}
    assert [s["name"] for s in run["steps"]] == ["read", "map", "write"]
    breakdown = run["duration_breakdown"]
    # From acceptance to the end: queued 200 ms, then the run's own 1,500 ms.
    assert breakdown["total_ms"] == pytest.approx(1700.0) and breakdown["queued_ms"] == pytest.approx(200.0)
    # Both attempts of the read (30 + 40 ms) count as reading, and the backoff between them (the failed attempt
    # ended at its event, the next began 100 ms later) as waiting.
    assert breakdown["read_ms"] == 70 and breakdown["transform_ms"] == 5 and breakdown["write_ms"] == 60
    assert breakdown["wait_ms"] == pytest.approx(100.0)
    parts = ("queued_ms", "wait_ms", "read_ms", "transform_ms", "write_ms", "other_ms")
    assert sum(breakdown[p] for p in parts) == pytest.approx(breakdown["total_ms"])

    errors = (await ok(env, "/v1/runs/run_sync_0001/record-errors"))["data"]
    assert [(e["record_key"], e["field_path"]) for e in errors] == [
        ("contact-7", "email"),
        ("contact-9", "address.zip"),
    ]
    assert errors[0]["raw_error"] == {"code": "E_REQUIRED", "field": "email"}

    logs = (await ok(env, "/v1/runs/run_sync_0001/logs"))["data"]
    # The executor's lines, and in seq order among them an INFO line for each step start and success (derived by
    # the projector from those events).
    assert [(entry["level"], entry["message"]) for entry in logs] == [
        ("INFO", "step read started (http_request, attempt 1)"),
        ("INFO", "step read started (http_request, attempt 2)"),
        ("INFO", "step read succeeded in 40 ms (attempt 2)"),
        ("INFO", "read 5 contacts"),
        ("INFO", "step map started (transform, attempt 1)"),
        ("INFO", "step map succeeded in 5 ms (attempt 1)"),
        ("WARNING", "contact 7 has no email"),
        ("INFO", "step write started (http_request, attempt 1)"),
        ("INFO", "step write succeeded in 60 ms (attempt 1)"),
        ("ERROR", "2 records rejected"),
    ]
    assert [entry["seq"] for entry in logs] == sorted(entry["seq"] for entry in logs)
    assert logs[2]["step"] == "read" and logs[2]["fields"] == {"attempt": 2, "duration_ms": 40.0}
    warnings = (await ok(env, "/v1/runs/run_sync_0001/logs", level="warning,error"))["data"]
    assert [entry["message"] for entry in warnings] == ["contact 7 has no email", "2 records rejected"]
    at_least = (await ok(env, "/v1/runs/run_sync_0001/logs", level="WARNING"))["data"]  # a minimum: errors too
    assert [entry["level"] for entry in at_least] == ["WARNING", "ERROR"]
    assert [e["level"] for e in (await ok(env, "/v1/runs/run_sync_0001/logs", level="error"))["data"]] == ["ERROR"]
    assert warnings[0]["fields"] == {"contact": 7}
    bad = await get(env, "/v1/runs/run_sync_0001/logs", level="LOUD")
    assert bad.status_code == 422 and "LOUD" in bad.json()["error"]["message"]


async def test_as_of_returns_the_run_as_it_stood_then(env: Env) -> None:
    sync = next(r for r in RUNS if r.run_id == "run_sync_0001")
    retrying_at = next(e.seq for e in sync.events if e.type == "StepAttemptFailed")
    then = await ok(env, "/v1/runs/run_sync_0001", as_of=str(retrying_at))
    assert then["status"] == "RUNNING"
    assert then["as_of"]["seq"] == retrying_at
    assert [(s["name"], s["status"]) for s in then["steps"]] == [("read", "RETRYING")]
    assert then["records"]["written"] == 0
    assert then["cursor_window"] == live_window(sync)

    # By time: just after the first step succeeded.
    succeeded = next(e for e in sync.events if e.type == "StepSucceeded")
    at = (succeeded.occurred_at + timedelta(milliseconds=1)).isoformat()
    later = await ok(env, "/v1/runs/run_sync_0001", as_of=at)
    assert [(s["name"], s["status"]) for s in later["steps"]] == [("read", "SUCCEEDED")]
    # The latest point in time is the run as it is now.
    now = await ok(env, "/v1/runs/run_sync_0001", as_of=str(len(sync.events) - 1))
    live = await ok(env, "/v1/runs/run_sync_0001")
    assert now["status"] == live["status"] == "PARTIAL"
    assert now["records"] == live["records"]
    assert [s["status"] for s in now["steps"]] == [s["status"] for s in live["steps"]]

    assert (await get(env, "/v1/runs/run_sync_0001", as_of="yesterday")).status_code == 422
    before = await get(env, "/v1/runs/run_sync_0001", as_of="2020-01-01T00:00:00Z")
    assert before.status_code == 404 and before.json()["error"]["code"] == "not_found"


async def test_q_finds_error_substrings_and_run_id_fragments(env: Env) -> None:
    rare = (await ok(env, "/v1/runs", q="XQZ is not"))["data"]
    assert [r["id"] for r in rare] == ["run_rare_0001"]
    expired = {r["id"] for r in (await ok(env, "/v1/runs", q="token for account"))["data"]}
    assert expired == {"run_order_0000", "run_order_0002", "run_order_0004"}
    assert [r["id"] for r in (await ok(env, "/v1/runs", q="sync_00"))["data"]] == ["run_sync_0001"]
    # LIKE wildcards are literal characters in q.
    assert (await ok(env, "/v1/runs", q="%"))["data"] == []
    assert (await ok(env, "/v1/runs", q="token", status="SUCCEEDED"))["data"] == []


async def test_sort_by_duration_with_cursors_and_offset(env: Env) -> None:
    fastest_first = (await ok(env, "/v1/runs", flow_id="orders", sort="duration", limit=100))["data"]
    durations = [r["duration_ms"] for r in fastest_first]
    # The unfinished run has no duration and sorts first ascending.
    assert durations[0] is None and durations[1:] == sorted(durations[1:])
    slowest = await ok(env, "/v1/runs", flow_id="orders", sort="-duration", limit=3)
    assert [r["duration_ms"] for r in slowest["data"]] == [600.0, 500.0, 400.0]
    following = await ok(env, "/v1/runs", flow_id="orders", sort="-duration", limit=3, cursor=slowest["next_cursor"])
    assert [r["duration_ms"] for r in following["data"]] == [300.0, 200.0, 100.0]
    back = await ok(env, "/v1/runs", flow_id="orders", sort="-duration", limit=3, cursor=following["prev_cursor"])
    assert [r["id"] for r in back["data"]] == [r["id"] for r in slowest["data"]]
    by_offset = await ok(env, "/v1/runs", flow_id="orders", sort="-duration", limit=3, offset=3)
    assert [r["id"] for r in by_offset["data"]] == [r["id"] for r in following["data"]]

    mixed = await get(env, "/v1/runs", sort="created_at", cursor=slowest["next_cursor"])
    assert mixed.status_code == 400 and "sort" in mixed.json()["error"]["message"]
    assert (await get(env, "/v1/runs", sort="colour")).status_code == 422
    by_status = (await ok(env, "/v1/runs", sort="status", limit=100))["data"]
    assert [r["status"] for r in by_status] == sorted(r["status"] for r in by_status)


async def test_failure_groups_fold_ids_and_numbers_and_suggest_a_next_action(env: Env) -> None:
    groups = (await ok(env, "/v1/analytics/failure-groups", flow_id="orders"))["data"]
    auth = next(g for g in groups if g["category"] == "AUTH")
    assert auth["runs"] == 3  # not 6: every event was delivered twice
    assert auth["step"] == "push"
    assert auth["message_pattern"] == "token for account <n> expired at step push (<id>)"
    assert auth["last_run_id"] == "run_order_0004"
    assert "re-authorise" in auth["next_action"]
    members = (await ok(env, "/v1/runs", error_fingerprint=auth["fingerprint"]))["data"]
    assert {r["id"] for r in members} == {"run_order_0000", "run_order_0002", "run_order_0004"}
    assert {g["category"] for g in groups} == {"AUTH", "VALIDATION"}
    assert (await ok(env, "/v1/analytics/failure-groups", category="transient"))["data"] == []


async def test_flakiness_pass_rate_percentiles_and_endpoint_coverage(env: Env) -> None:
    flaky = (await ok(env, "/v1/analytics/flakiness", flow_id="orders"))["data"]
    # push fails half the time (most flaky); fetch failed once in seven (the rare currency error).
    assert [(f["step"], f["succeeded"], f["failed"], f["score"]) for f in flaky] == [
        ("push", 3, 3, 1.0),
        ("fetch", 6, 1, round(2 / 7, 4)),
    ]

    nope = await get(env, "/v1/analytics/flows/nope")
    assert nope.status_code == 404 and nope.json()["error"]["code"] == "not_found"
    day_of_t0 = {"from": "2026-11-20T00:00:00Z", "to": "2026-11-21T00:00:00Z"}
    stats = await ok(env, "/v1/analytics/flows/orders", **day_of_t0)
    assert stats["runs"] == 7  # the unfinished run is not counted yet
    assert stats["pass_rate"] == round(3 / 7, 4)
    (day,) = stats["series"]
    assert day["by_status"] == {"FAILED": 4, "SUCCEEDED": 3}
    assert day["by_trigger"] == {"webhook": 7}
    assert day["duration_ms"]["p50"] == 300.0
    assert day["duration_ms"]["p99"] == pytest.approx(594.0)

    coverage = (await ok(env, "/v1/analytics/endpoints"))["data"]
    assert [(c["method"], c["host"], c["route"], c["calls"]) for c in coverage] == [
        ("GET", "crm.example.com", "/v2/contacts/{id}", 2),
        ("POST", "erp.example.com", "/api/customers", 1),
        ("GET", "shop.example.com", "/orders/{id}", 6),
    ]


async def test_request_ids_are_echoed_and_named_in_errors(env: Env) -> None:
    missing = await env.api("GET", "/v1/runs/run_nope", headers={"X-Request-Id": "trace-42"})
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] == "trace-42"
    assert missing.json()["error"] == {"code": "not_found", "message": "no run with id 'run_nope'",
                                       "request_id": "trace-42"}  # fmt: skip
    fine = await env.api("GET", "/v1/runs")
    assert fine.headers["x-request-id"].startswith("req_")
    assert len(fine.headers.get_list("x-request-id")) == 1
