"""What a chaos run must show after its faults, read from the ledger topic itself (the truth, docs/architecture.md
invariants 1 to 5 and 9) and from the upstream's own count of calls: every accepted trigger has exactly one run, that
run ended, its seqs are 0..n with no gap and one event each, no input was decided twice, and every HTTP step called
its upstream as its retry policy allows."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from schemas.status import TERMINAL_RUN_EVENTS
from tests.chaos.load import FAILING_ATTEMPTS, HTTP_RETRY, LIMIT, CountingUpstream
from tests.harness import Record

_MAX_LISTED = 10


@dataclass
class Outcome:
    """The counts the report prints and every problem found (an empty list: nothing lost)."""

    accepted: int = 0
    final: int = 0
    missing: int = 0
    duplicated: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    events: int = 0
    copies: int = 0  # the same event appended twice at one seq (the same bytes): deduped by consumers
    http_keys: int = 0
    http_calls: int = 0
    http_repeats: int = 0  # a key called again (its attempt redone after a crash): what the key is for
    limited_peak: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, items: list[Any]) -> None:
        if items:
            shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
            self.problems.append(f"{kind}: {len(items)} ({shown}{' …' if len(items) > _MAX_LISTED else ''})")


def check(accepted: dict[str, tuple[str, int]], records: list[Record], upstream: CountingUpstream,
          executors: int) -> Outcome:  # fmt: skip
    """Every accepted run (run id → (flow, input number)) against the ledger's records and the upstream's calls."""
    out = Outcome(accepted=len(accepted))
    by_run: dict[str, dict[int, set[bytes]]] = defaultdict(lambda: defaultdict(set))
    decoded: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        if record.value is None:
            continue
        event = orjson.loads(record.value)
        seqs = by_run[event["run_id"]][event["seq"]]
        if record.value in seqs:
            out.copies += 1
        seqs.add(record.value)
        decoded[event["run_id"]][event["seq"]] = event
        out.events += 1

    out.problem("seqs with two different events", [f"{r} seq {s}" for r, seqs in by_run.items()
                                                   for s, values in seqs.items() if len(values) > 1])  # fmt: skip
    gaps = [r for r, seqs in by_run.items() if sorted(seqs) != list(range(len(seqs)))]
    out.problem("runs with a gap in their seqs", gaps)
    out.problem("runs in the ledger no trigger was answered with", sorted(set(by_run) - set(accepted)))
    missing = [r for r in accepted if r not in by_run]
    out.missing = len(missing)
    out.problem("accepted runs missing from the ledger", missing)

    runs_of_number: dict[int, set[str]] = defaultdict(set)
    unended, doubled = [], []
    for run_id, events in decoded.items():
        ordered = [events[s] for s in sorted(events)]
        requested = [e for e in ordered if e["type"] == "RunRequested"]
        for e in requested:
            runs_of_number[e["payload"]["trigger"]["payload"]["n"]].add(run_id)
        if len(requested) != 1:
            doubled.append(f"{run_id} ({len(requested)} RunRequested)")
        endings = [e for e in ordered if e["type"] in TERMINAL_RUN_EVENTS]
        if len(endings) != 1:
            unended.append(f"{run_id} ({len(endings)} endings: {[e['type'] for e in ordered][-4:]})")
        else:
            out.statuses[TERMINAL_RUN_EVENTS[endings[0]["type"]].value] += 1
        doubled += _double_decisions(run_id, ordered)
    out.final = sum(out.statuses.values())
    out.problem("runs without exactly one ending", unended)
    out.problem("double decisions", doubled)
    twice = [f"input {n}: {sorted(ids)}" for n, ids in runs_of_number.items() if len(ids) > 1]
    out.duplicated = sum(len(ids) - 1 for ids in runs_of_number.values())
    out.problem("triggers with more than one run", twice)
    wrong = [(flow_id, n) for run_id, (flow_id, n) in accepted.items() if run_id not in runs_of_number.get(n, {run_id})]
    out.problem("accepted run ids whose run has another input", wrong)
    out.problem("runs not SUCCEEDED", [f"{status}: {count}" for status, count in out.statuses.items()
                                       if status != "SUCCEEDED"])  # fmt: skip

    _check_http(out, accepted, decoded, upstream)
    out.limited_peak = _peak([decoded[r] for r, (flow_id, _) in accepted.items() if flow_id == "limited"])
    if out.limited_peak > LIMIT:  # exact over every executor (docs/architecture.md, Admission)
        out.problems.append(f"limited flow: {out.limited_peak} runs RUNNING at once over {executors} executor(s), "
                            f"limit {LIMIT}")  # fmt: skip
    return out


def _double_decisions(run_id: str, ordered: list[dict[str, Any]]) -> list[str]:
    """An input decided twice shows as the same event (type, step, attempt) caused twice by it, or a step attempt
    started twice, or a step succeeding twice."""
    found = []
    caused = Counter((e["causation_id"], e["type"], _step(e)) for e in ordered if e["type"] != "LogEmitted")
    found += [f"{run_id}: {what[1]} {what[2]} twice from input {what[0]}" for what, n in caused.items() if n > 1]
    started = Counter(_step(e) for e in ordered if e["type"] == "StepStarted")
    found += [f"{run_id}: StepStarted {what} x{n}" for what, n in started.items() if n > 1]
    succeeded = Counter(_step(e)[0] for e in ordered if e["type"] == "StepSucceeded")
    found += [f"{run_id}: StepSucceeded {what} x{n}" for what, n in succeeded.items() if n > 1]
    return found


def _step(event: dict[str, Any]) -> tuple[Any, Any]:
    payload = event.get("payload") or {}
    return payload.get("step"), payload.get("attempt")


def _check_http(out: Outcome, accepted: dict[str, tuple[str, int]], decoded: dict[str, dict[int, dict[str, Any]]],
                upstream: CountingUpstream) -> None:  # fmt: skip
    """Per HTTP run: attempts 1..FAILING_ATTEMPTS answered 503 and failed in the ledger, the next answered 200 and
    succeeded; no attempt past it and none past the policy; a key called again only redoes its own attempt."""
    keys_of_run: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for key, calls in upstream.keys.items():
        run_id, _, attempt = key.rsplit(":", 2)
        keys_of_run[run_id][int(attempt)] = calls.answers
        out.http_keys += 1
        out.http_calls += len(calls.answers)
        out.http_repeats += len(calls.answers) - 1
    wanted = list(range(1, FAILING_ATTEMPTS + 2))
    assert FAILING_ATTEMPTS < len(HTTP_RETRY["delays_s"]) + 1
    wrong = []
    for run_id, (flow_id, _) in accepted.items():
        if flow_id != "http":
            if run_id in keys_of_run:
                wrong.append(f"{run_id}: not an HTTP run, called the upstream")
            continue
        attempts = keys_of_run.get(run_id, {})
        if sorted(attempts) != wanted:
            wrong.append(f"{run_id}: attempts called {sorted(attempts)}, expected {wanted}")
            continue
        for number, answers in attempts.items():
            expected = 503 if number <= FAILING_ATTEMPTS else 200
            if set(answers) != {expected}:
                wrong.append(f"{run_id}: attempt {number} answered {answers}")
        events = decoded.get(run_id, {}).values()
        failed = sorted(e["payload"]["attempt"] for e in events if e["type"] == "StepAttemptFailed")
        succeeded = [e for e in events if e["type"] == "StepSucceeded" and _step(e)[0] == "call"]
        if failed != wanted[:-1] or len(succeeded) != 1:
            wrong.append(f"{run_id}: ledger has attempts failed {failed}, call succeeded {len(succeeded)}x")
    out.problem("HTTP steps calling their upstream other than the retry policy allows", wrong)
    out.problem("upstream calls without an idempotency key", [upstream.without_key] if upstream.without_key else [])


def _peak(runs: list[dict[int, dict[str, Any]]]) -> int:
    """The most runs RUNNING at once (RunStarted to its ending, by the executor's clock)."""
    edges: list[tuple[datetime, int]] = []
    for events in runs:
        for e in events.values():
            if e["type"] == "RunStarted":
                edges.append((datetime.fromisoformat(e["occurred_at"]), 1))
            elif e["type"] in TERMINAL_RUN_EVENTS:
                edges.append((datetime.fromisoformat(e["occurred_at"]), -1))
    running = peak = 0
    for _, delta in sorted(edges):  # at one instant an ending sorts before a start
        running += delta
        peak = max(peak, running)
    return peak
