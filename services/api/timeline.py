"""A run as it stood at a point in its history, folded from its events with the projector's own fold
(services/common/runfold), and where its time went. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from schemas.codec import DecodeError, ledger_event_from_dict
from schemas.events import EventBase, RunRequested
from services.common.contract import parse_count, parse_timestamp
from services.common.runfold.details import RECORD_COUNTERS, plan_details
from services.common.runfold.rows import plan


def rebuild_event(run: Mapping[str, Any], row: Mapping[str, Any]) -> EventBase:
    """A run_events row (which stores the payload, not the envelope's flow fields) back into its event."""
    return ledger_event_from_dict(
        {
            "event_id": row["event_id"],
            "type": row["type"],
            "tenant_id": run["tenant_id"],
            "run_id": run["id"],
            "flow_id": run["flow_id"],
            "flow_version": run["flow_version"],
            "seq": row["seq"],
            "occurred_at": row["occurred_at"],
            "causation_id": row["causation_id"],
            "correlation_id": run["id"],
            "payload": row["payload"],
        }
    )


def as_of(run: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary fields and steps of the run after the given events (seq 0..n, in order)."""
    try:
        events = [rebuild_event(run, r) for r in rows]
    except DecodeError as exc:  # pragma: no cover - the projector stored only events it decoded
        raise ValueError(f"stored event does not decode: {exc}") from exc
    if not events or not isinstance(events[0], RunRequested):
        raise ValueError("the run has no events up to that point")
    batch = plan(events)
    view = dict(batch.new_runs[run["id"]])
    details = plan_details(events)
    counters = details.records.get(run["id"], dict.fromkeys(RECORD_COUNTERS, 0))
    view.update({f"records_{n}": counters[n] for n in RECORD_COUNTERS})
    failure = details.failures.get(run["id"])
    view["error_category"] = failure.category if failure else None
    view["error_fingerprint"] = failure.fingerprint if failure else None
    view["last_seq"] = events[-1].seq
    attempts: dict[str, list[dict[str, Any]]] = {}
    for (_, step, _), a in sorted(details.attempts.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        attempts.setdefault(step, []).append(
            {
                "attempt": a.attempt, "status": a.status, "error": a.error, "retry_at": a.retry_at,
                "started_at": a.started_at, "finished_at": a.finished_at, "duration_ms": a.duration_ms,
                "output": a.output,
            }
        )  # fmt: skip
    steps = sorted(batch.step_changes.values(), key=lambda c: c.position)
    view["steps"] = [
        {
            "name": c.step, "position": c.position, "action": c.action, "status": c.status, "attempt": c.attempt or 1,
            "input": c.input, "output": c.output, "error": c.error, "assertions": c.assertions or [],
            "extractions": c.extractions or {}, "started_at": c.started_at, "finished_at": c.finished_at,
            "duration_ms": c.duration_ms, "attempts": attempts.get(c.step, []), "reused_from": c.reused_from,
            "reason": c.reason,
        }
        for c in steps
    ]  # fmt: skip
    return view


def parse_as_of(text: str) -> int | datetime:
    """`?as_of=12` is a seq; anything else must be an ISO 8601 timestamp."""
    if text.isascii() and text.isdigit():
        return parse_count(text)
    return parse_timestamp(text)


_READ_ACTIONS = {"database_query", "kafka_consume"}
_WRITE_ACTIONS = {"kafka_produce"}


def phase(action: str | None, step_input: Any) -> str:
    """Which part of the duration breakdown (read, transform, write, wait, other) a step's time counts toward."""
    if action == "http_request":
        method = str(step_input.get("method", "GET")).upper() if isinstance(step_input, dict) else "GET"
        return "read" if method in ("GET", "HEAD", "OPTIONS") else "write"
    if action in _READ_ACTIONS:
        return "read"
    if action in _WRITE_ACTIONS:
        return "write"
    if action in ("transform", "python"):
        return "transform"
    return "wait" if action in ("delay", "human_input") else "other"


def breakdown(run: Mapping[str, Any], steps: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """Where a run's time went, in parts that add up: queued + wait + read + transform + write + other = total.

    `total_ms` is the wall clock from acceptance to the final status (`queued_ms` the wait before the first step
    plus the run's own duration). Each attempt of each step counts toward its phase (read, transform, write; delays
    and human_input pauses are `wait`), and so does the time between a failed attempt and the next one (its retry
    backoff, `wait`). Steps reused from an earlier run ran there: they count nothing here. `other_ms` is what is
    left: the executor's own time between steps. While the run is not final, total and other are null.
    """
    created, started, finished = run.get("created_at"), run.get("started_at"), run.get("finished_at")
    queued = (started - created).total_seconds() * 1000 if created and started else None
    out: dict[str, float | None] = {
        "total_ms": None, "queued_ms": queued,
        "read_ms": 0.0, "transform_ms": 0.0, "write_ms": 0.0, "wait_ms": 0.0, "other_ms": None,
    }  # fmt: skip
    for s in steps:
        if s.get("reused_from"):
            continue
        for key, ms in _phases(s).items():
            out[key] = (out[key] or 0.0) + ms
    duration = run.get("duration_ms")
    if duration is None and finished and started:
        duration = (finished - started).total_seconds() * 1000
    if finished is not None and duration is not None:
        total = (queued or 0.0) + float(duration)
        counted = sum(float(out[k] or 0.0) for k in ("queued_ms", "read_ms", "transform_ms", "write_ms", "wait_ms"))
        out["total_ms"] = total
        out["other_ms"] = max(0.0, total - counted)
    else:
        out["other_ms"] = None
    return out


def _phases(step: Mapping[str, Any]) -> dict[str, float]:
    """A step's time by phase: each attempt's, and the backoff between attempts as wait."""
    attempts = [a for a in step.get("attempts") or () if a.get("duration_ms") is not None]
    if not attempts:
        return _attempt_phases(step, float(step.get("duration_ms") or 0.0))
    out: dict[str, float] = {}
    previous_end = None
    for attempt in attempts:
        # The output's read/transform/write split (sync_records) is the last attempt's own.
        shaped = step if attempt is attempts[-1] else {**step, "output": None}
        for key, ms in _attempt_phases(shaped, float(attempt["duration_ms"])).items():
            out[key] = out.get(key, 0.0) + ms
        begun = attempt.get("started_at")
        if previous_end is not None and begun is not None and begun > previous_end:
            out["wait_ms"] = out.get("wait_ms", 0.0) + (begun - previous_end).total_seconds() * 1000
        previous_end = attempt.get("finished_at")
    return out


def _attempt_phases(step: Mapping[str, Any], duration: float) -> dict[str, float]:
    """A step's time by phase. A sync_records step reads, maps and writes in one step; its output says how long
    each took (`timing_ms`), and the rest of its time (setup, recording) is `other`."""
    timing = step.get("output", {}).get("timing_ms") if isinstance(step.get("output"), dict) else None
    if step.get("action") == "sync_records" and isinstance(timing, dict):
        split = {f"{p}_ms": float(timing.get(p) or 0.0) for p in ("read", "transform", "write")}
        return {**split, "other_ms": max(0.0, duration - sum(split.values()))}
    return {f"{phase(step.get('action'), step.get('input'))}_ms": duration}
