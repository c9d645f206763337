"""Batch boundaries must not show in the read models (invariant 1: a rebuild equals the live projection).

The live projector and a rebuild's replay cut the same log into different batches (live: whatever arrived
while the previous transaction ran; replay: up to `batch_max_records`), and the live one sees redeliveries.
Here one ledger of every run shape, decided by the executor's pure decide/fold, is applied to the real
database as one batch, one event per batch, many random cuts and with redelivered events; every derived
table must come out identical, compared row by row with verify's own comparison.
"""

from __future__ import annotations

import itertools
import random
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from schemas.events import CancelRun, ChildRunFinished, EventBase, ResumeRun, RetryStrategy
from services.executor.decide import Admission, CommandInput, DeadlinePassed, PauseExpired, StartRun
from services.projector import rebuild
from services.projector.adapters import details, store
from services.projector.adapters.store import Positioned, apply_batch
from tests.unit.drive import Run, error, make_flow, make_trigger, retried_step_log

TWO = ({"name": "fetch"}, {"name": "push"})
ANATOMY = ({"name": "fetch", "action": "http_request", "input": {"url": "https://api.example.com/{{ trigger.id }}"}},
           {"name": "notify", "run_condition": "steps.fetch.output.body.total > `100`",
            "input": {"total": "{{ steps.fetch.output.body.total }}", "token": "tok-1"}},
           {"name": "push"})  # fmt: skip
APPROVAL = ({"name": "prepare"}, {"name": "approve", "action": "human_input", "input": {"q": "ok?"}, "timeout_s": 60},
            {"name": "ship"})  # fmt: skip


def _run(
    run_id: str,
    *steps: dict[str, Any],
    admission: Admission | None = None,
    flow: dict[str, Any] | None = None,
    **trigger: Any,
) -> Run:
    run = Run(make_flow(*steps, **(flow or {})), make_trigger(run_id, payload={"id": run_id}, **trigger))
    run.feed(StartRun(run.trigger, 3, admission or Admission()))
    return run


def _shapes() -> list[Run]:
    """One run per shape the mixed e2e workload drives."""
    runs: list[Run] = []
    ok = _run("r_ok", *TWO)
    ok.complete(output={"a": 1})
    ok.complete(output={"b": 2})
    runs.append(ok)

    retried = _run("r_retried", *TWO)  # TRANSIENT twice, then it passes
    for _ in range(2):
        retried.complete(ok=False, err=error("TRANSIENT", "503 from upstream"), took_s=0.25)
        retried.fire_timer()
    retried.complete(output={"a": 1})
    retried.complete(output={"b": 2})
    runs.append(retried)

    # Canceled while its step waits to retry: StepAttemptFailed then StepCanceled of the same attempt.
    waiting = _run("r_cancel_retrying", *TWO)
    waiting.complete(ok=False, err=error("TRANSIENT", "503 from upstream"), took_s=0.25)
    waiting.feed(CommandInput(CancelRun(tenant_id="t1", run_id="r_cancel_retrying", reason="stop",
                                        bulk_operation_id="bulk_1")))  # fmt: skip
    runs.append(waiting)

    # The flow's deadline passes while a step waits to retry.
    late = _run("r_deadline_retrying", *TWO, flow={"timeout_s": 30})
    late.complete(ok=False, err=error("TRANSIENT", "503 from upstream"), took_s=0.5)
    late.now += timedelta(seconds=31)
    late.feed(DeadlinePassed("r_deadline_retrying"))
    runs.append(late)

    running = _run("r_cancel_running", *TWO)
    running.feed(CommandInput(CancelRun(tenant_id="t1", run_id="r_cancel_running")))
    runs.append(running)

    failed = _run("r_failed", *TWO)
    failed.complete(output={"a": 1})
    failed.complete(ok=False, err=error("VALIDATION", "rejected"), output={"status": 422})
    runs.append(failed)

    # FROM_FAILED_STEP: the retry reuses `fetch` and runs `push` again.
    again = _run("r_retry_of_failed", *TWO, retry_of="r_failed", retry_strategy=RetryStrategy.FROM_FAILED_STEP,
                 reuse={"fetch": {"a": 1}})  # fmt: skip
    again.complete(output={"b": 2})
    runs.append(again)

    timed_out = _run("r_step_timeout", {"name": "call", "retry": {"delays_s": []}})
    timeout = error("TRANSIENT", "step timed out after 1s").model_copy(update={"code": "timeout"})
    timed_out.complete(ok=False, err=timeout)
    runs.append(timed_out)

    for name, end in (("r_resumed", "resume"), ("r_expired", "expire"), ("r_cancel_paused", "cancel")):
        paused = _run(name, *APPROVAL)
        paused.complete(output={"order": 1})
        pause = paused.events[-1].payload
        if end == "resume":
            paused.now += timedelta(seconds=2)
            paused.feed(CommandInput(ResumeRun(tenant_id="t1", run_id=name, request_id=pause.request_id,
                                               payload={"approved": True})))  # fmt: skip
            paused.complete(output={"shipped": True})
        elif end == "expire":
            paused.now = pause.expires_at
            paused.feed(PauseExpired(name, pause.request_id))
        else:
            paused.feed(CommandInput(CancelRun(tenant_id="t1", run_id=name)))
        runs.append(paused)

    parent = _run("r_parent", {"name": "spawn", "action": "subflow", "input": {"flow_id": "child"}}, {"name": "after"})
    parent.now += timedelta(seconds=1)
    parent.feed(CommandInput(ChildRunFinished(tenant_id="t1", run_id="r_parent", child_run_id="r_child", step="spawn",
                                              attempt=1, status="SUCCEEDED", output={"n": 2})))  # fmt: skip
    parent.complete(output={"done": True})
    runs.append(parent)

    blocked = _run("r_blocked", *TWO, admission=Admission(flow_active=1), flow={"concurrency_limit": 1})
    runs.append(blocked)

    # Step anatomy: an http_request answered 503 then 200 (each attempt keeps its answer), a step skipped by its
    # run_condition (action, input, reason), and an INFO line per start, success and skip in run_logs.
    anatomy = _run("r_anatomy", *ANATOMY)
    anatomy.complete(ok=False, err=error("TRANSIENT", "GET answered 503"), output={"status": 503, "body": "busy"},
                     took_s=0.25)  # fmt: skip
    anatomy.fire_timer()
    anatomy.complete(output={"status": 200, "body": {"total": 40}})
    anatomy.complete(output={"b": 2})
    runs.append(anatomy)
    runs += _searched()
    return runs


def _refused(i: int, message: str = "Please enter value(s) for: Email") -> dict[str, Any]:
    body = {"o:errorDetails": [{"detail": message, "o:errorCode": "USER_ERROR", "record": f"c-{i}"}]}
    return {"record_key": f"c-{i}", "field_path": "email", "error": message, "raw_error": {"status": 400, "body": body}}


def _searched() -> list[Run]:
    """Runs whose events feed runs.search_details (`q`): record errors, repeated and past the per-run bound, and a
    failed http_request step with the upstream's 401 body."""
    sync = ({"name": "sync", "action": "sync_records", "input": {}}, {"name": "call", "action": "http_request",
            "input": {"url": "https://crm.example.com/me"}, "retry": {"delays_s": []}})  # fmt: skip
    refused = _run("r_records_then_401", *sync)
    # One reason many times (it counts once), then another; the step passes with its records refused.
    failures = [_refused(i) for i in range(4)] + [_refused(9, "Invalid zip XQ-90210")]
    refused.complete(output={"counters": {"read": 6, "written": 1, "failed": 5}, "failures": failures})
    body = {"error": "invalid_token", "error_description": "The access token expired"}
    refused.complete(ok=False, err=error("AUTH", "GET https://crm.example.com/me answered 401 Unauthorized"),
                     output={"status": 401, "headers": {"content-type": "application/json"}, "body": body})  # fmt: skip
    # Far more refused records than the search text holds: it stops at its bound wherever the batches are cut.
    flood = _run("r_records_flood", sync[0])
    many = [_refused(i, f"record {i} refused: field {i % 7} is invalid") for i in range(400)]
    flood.complete(output={"counters": {"read": 400, "failed": 400}, "failures": many})
    return [refused, flood]


def _ledger() -> list[EventBase]:
    """The runs' events interleaved the way one partition would hold them (each run's in seq order)."""
    rng = random.Random(7)
    queues = [list(r.ledger) for r in _shapes()]
    out: list[EventBase] = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    return out


async def _project(db: asyncpg.Connection, batches: list[list[tuple[int, EventBase]]]) -> None:
    tables = [*rebuild.DERIVED, "projector_offsets", "purged_runs"]
    await db.execute(f"TRUNCATE {', '.join(tables)}")
    for batch in batches:
        await apply_batch(db, "g", [Positioned("ledger", 0, offset, e) for offset, e in batch], side_effects=False)


def _splits(n: int) -> dict[str, list[list[int]]]:
    """Ways to cut offsets 0..n-1 into batches; `redelivered` repeats earlier offsets as Kafka may."""
    out = {"one batch": [list(range(n))], "one event per batch": [[i] for i in range(n)]}
    for seed in range(12):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, 12)))
        out[f"cuts {seed}"] = [list(range(a, b)) for a, b in itertools.pairwise([0, *cuts, n])]
    rng = random.Random(99)
    redelivered, start = [], 0
    while start < n:
        end = min(n, start + rng.randint(1, 9))
        redelivered.append(list(range(max(0, start - rng.randint(0, 5)), end)))
        start = end
    out["redelivered"] = redelivered
    return out


async def test_any_split_of_the_log_into_batches_gives_the_same_rows(db: asyncpg.Connection) -> None:
    ledger = _ledger()
    assert {"StepAttemptFailed", "StepCanceled", "RunPaused", "RunResumed", "RunTimedOut", "RecordFailed"} <= {
        e.type for e in ledger
    }
    splits = _splits(len(ledger))
    schema = await db.fetchval("SELECT current_schema()")
    await _project(db, [[(i, ledger[i]) for i in b] for b in splits.pop("one batch")])
    expected = await rebuild.checksums(db, schema)
    for name, offsets in splits.items():
        await _project(db, [[(i, ledger[i]) for i in b] for b in offsets])
        got = await rebuild.checksums(db, schema)
        differing = {t for t in expected if expected[t] != got[t]}
        assert not differing, f"{name}: {sorted(differing)} differ from projecting the whole log in one batch"


async def test_copy_through_staging_and_array_parameters_give_the_same_rows(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large batches send events, step changes and logs by COPY into staging tables, small ones as array parameters:
    the whole log and its random cuts project to the same rows either way."""
    ledger = _ledger()
    schema = await db.fetchval("SELECT current_schema()")
    await store.stage(db)
    splits = _splits(len(ledger))
    got: dict[int, list[dict[str, tuple[int, str]]]] = {}
    for copy_from in (1, 10**9):  # every batch staged, then none
        monkeypatch.setattr(store, "COPY_FROM_ROWS", copy_from)
        monkeypatch.setattr(details, "COPY_FROM_ROWS", copy_from)
        got[copy_from] = []
        for name in ("one batch", "cuts 0", "cuts 1", "redelivered"):
            await _project(db, [[(i, ledger[i]) for i in b] for b in splits[name]])
            got[copy_from].append(await rebuild.checksums(db, schema))
    assert got[1] == got[10**9]


async def test_an_attempt_canceled_while_waiting_to_retry_keeps_its_duration_in_any_batching(
    db: asyncpg.Connection,
) -> None:
    run = _shapes()[2]
    assert run.trigger.run_id == "r_cancel_retrying"
    ledger = run.ledger
    cut = next(i for i, e in enumerate(ledger) if e.type == "StepAttemptFailed") + 1
    rows = []
    for batches in ([ledger], [ledger[:cut], ledger[cut:]]):
        offset = itertools.count()
        await _project(db, [[(next(offset), e) for e in b] for b in batches])
        rows.append(await db.fetchrow(
            "SELECT status, duration_ms, error->>'message' AS error, retry_at IS NOT NULL AS retry_at "
            "FROM step_attempts WHERE step = 'fetch' AND attempt = 1"
        ))  # fmt: skip
    assert rows[0] == rows[1]
    assert dict(rows[0]) == {"status": "CANCELED", "duration_ms": 250.0, "error": "503 from upstream", "retry_at": True}


async def test_search_text_is_bounded_and_the_same_in_any_batching(db: asyncpg.Connection) -> None:
    """runs.search_details (what `q` finds besides id and error): the same text whether a run's events arrive in one
    batch or one per batch, a repeated record error once, at most 4,096 characters however many records fail."""
    texts = []
    for run in _searched():
        for batches in ([run.ledger], [[e] for e in run.ledger]):
            offset = itertools.count()
            await _project(db, [[(next(offset), e) for e in b] for b in batches])
            texts.append(await db.fetchval("SELECT search_details FROM runs WHERE id = $1", run.trigger.run_id))
    refused, refused_split, flood, flood_split = texts
    assert refused == refused_split and flood == flood_split
    # The message once, then each record's own raw error (they differ by the record they name), in seq order.
    assert refused.count("Please enter value(s) for: Email") == 1 + 4
    assert refused.startswith("Please enter value(s) for: Email\nbody: o:errorDetails: detail: Please enter")
    assert "Invalid zip XQ-90210" in refused and "c-3" in refused
    assert "error_description: The access token expired" in refused and "invalid_token" in refused
    assert len(flood) == 4096 and flood.startswith("record 0 refused")


async def test_step_anatomy_is_the_same_in_any_batching(db: asyncpg.Connection) -> None:
    """A skipped step's action, input and reason, each attempt's answer and the derived INFO lines, whether the
    run's events arrive in one batch or one per batch."""
    run = next(r for r in _shapes() if r.trigger.run_id == "r_anatomy")
    seen = []
    for batches in ([run.ledger], [[e] for e in run.ledger]):
        offset = itertools.count()
        await _project(db, [[(next(offset), e) for e in b] for b in batches])
        seen.append((
            [dict(r) for r in await db.fetch("SELECT step, action, input, reason FROM run_steps ORDER BY position")],
            [dict(r) for r in await db.fetch("SELECT step, attempt, status, output FROM step_attempts "
                                             "ORDER BY step, attempt")],
            [dict(r) for r in await db.fetch("SELECT seq, level, step, message FROM run_logs ORDER BY seq")],
        ))  # fmt: skip
    assert seen[0] == seen[1]
    steps, attempts, logs = seen[0]
    assert steps[1] == {"step": "notify", "action": "transform", "input": {"total": 40, "token": "***"},
                        "reason": 'run_condition "steps.fetch.output.body.total > `100`" was false'}  # fmt: skip
    assert [(a["step"], a["attempt"], a["status"], a["output"]) for a in attempts] == [
        ("fetch", 1, "FAILED", {"status": 503, "body": "busy"}),
        ("fetch", 2, "SUCCEEDED", {"status": 200, "body": {"total": 40}}),
        ("push", 1, "SUCCEEDED", {"b": 2}),
    ]
    assert [(line["level"], line["message"]) for line in logs] == [
        *retried_step_log("fetch", "http_request", 1000, logs[1]["message"]),
        ("INFO", 'step notify skipped: run_condition "steps.fetch.output.body.total > `100`" was false'),
        ("INFO", "step push started (transform, attempt 1)"),
        ("INFO", "step push succeeded in 1000 ms (attempt 1)"),
    ]
