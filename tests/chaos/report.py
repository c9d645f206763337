"""The chaos run's one table: faults by kind, runs accepted / final / missing / duplicated, and recovery times
p50 / p99 / max per fault kind and per figure of docs/operations.md#recovery-figures; also as JSON."""

from __future__ import annotations

import statistics
from typing import Any

from tests.chaos.checks import Outcome
from tests.chaos.faults import Figures


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 2), "p99": round(p99, 2),
            "max": round(ordered[-1], 2)}  # fmt: skip


def table(figures: Figures, outcome: Outcome, extra: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("faults", "count", "", "", "")]
    rows += [(f"  {kind}", str(n), "", "", "") for kind, n in sorted(figures.landed.items())]
    rows.append(("  total", str(sum(figures.landed.values())), "", "", ""))
    rows.append(("runs", "", "", "", ""))
    for what, value in (("accepted", outcome.accepted), ("final", outcome.final), ("missing", outcome.missing),
                        ("duplicated", outcome.duplicated)):  # fmt: skip
        rows.append((f"  {what}", str(value), "", "", ""))
    rows.append(("  final statuses", " ".join(f"{s} {n}" for s, n in sorted(outcome.statuses.items())), "", "", ""))
    rows.append(("recovery (s)", "n", "p50", "p99", "max"))
    for what, samples in sorted(figures.samples.items()):
        s = summary(samples)
        rows.append((f"  {what}", str(s["n"]), f"{s['p50']:.2f}", f"{s['p99']:.2f}", f"{s['max']:.2f}"))
    rows.append(("checks", "", "", "", ""))
    facts = {
        "ledger events": outcome.events,
        "same event appended twice (deduped)": outcome.copies,
        "HTTP idempotency keys / calls / repeated calls": f"{outcome.http_keys} / {outcome.http_calls} / "
        f"{outcome.http_repeats}",
        "limited flow: most RUNNING at once": outcome.limited_peak,
        **extra,
        "problems": len(outcome.problems),
    }
    rows += [(f"  {what}", str(value), "", "", "") for what, value in facts.items()]
    width = max(len(r[0]) for r in rows)
    lines = []
    for r in rows:
        if r[2] or r[0] == "recovery (s)":
            lines.append(f"{r[0]:<{width}}  {r[1]:>5}  {r[2]:>7}  {r[3]:>7}  {r[4]:>7}")
        else:
            lines.append(f"{r[0]:<{width}}  {r[1]}".rstrip())
    return "\n".join(lines + [f"PROBLEM {p}" for p in outcome.problems])


def as_json(figures: Figures, outcome: Outcome, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "faults": dict(figures.landed),
        "fault_log": figures.log,
        "runs": {
            "accepted": outcome.accepted,
            "final": outcome.final,
            "missing": outcome.missing,
            "duplicated": outcome.duplicated,
            "statuses": dict(outcome.statuses),
        },
        "recovery_s": {what: summary(samples) for what, samples in figures.samples.items()},
        "checks": {
            "events": outcome.events,
            "copies": outcome.copies,
            "http_keys": outcome.http_keys,
            "http_calls": outcome.http_calls,
            "http_repeats": outcome.http_repeats,
            "limited_peak": outcome.limited_peak,
            "problems": outcome.problems,
        },
        **extra,
    }
