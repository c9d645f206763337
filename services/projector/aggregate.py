"""A batch's increments to the aggregate read models, from its DetailPlan and the rows of the runs it
touched. Pure, and the same for the live projector and a rebuild, so the two compare equal."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.common.runfold.details import DetailPlan

Run = Mapping[str, Any]


def failure_groups(plan: DetailPlan, runs: Mapping[str, Run]) -> list[tuple[Any, ...]]:
    """(tenant, environment, fingerprint, flow, step, category, pattern, sample, runs, first, last, last run)."""
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for run_id, failure in plan.failures.items():
        r = runs.get(run_id)
        if r is None or r["finished_at"] is None:
            continue
        key = (r["tenant_id"], r["environment"], failure.fingerprint)
        at = r["finished_at"]
        g = groups.get(key)
        if g is None:
            groups[key] = [*key, r["flow_id"], r["failed_step"], failure.category, failure.pattern,
                           r["error_message"] or "", 1, at, at, run_id]  # fmt: skip
            continue
        g[8] += 1
        g[9] = min(g[9], at)
        if (at, run_id) >= (g[10], g[11]):
            g[7], g[10], g[11] = r["error_message"] or "", at, run_id
    return [tuple(g) for g in groups.values()]


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def hourly(plan: DetailPlan, runs: Mapping[str, Run]) -> list[tuple[Any, ...]]:
    """Finished runs counted into their flow's hour of creation (UTC)."""
    cells: dict[tuple[str, str, str, datetime, str, str], list[Any]] = {}
    for run_id in dict.fromkeys(plan.finished):
        r = runs.get(run_id)
        if r is None:
            continue
        key = (r["tenant_id"], r["flow_id"], r["environment"], _hour(r["created_at"]), r["status"], r["trigger_type"])
        cell = cells.setdefault(key, [0, Decimal(0), 0, 0])
        cell[0] += 1
        # Decimal from the float's shortest repr: exact sums, whatever the batching.
        cell[1] += Decimal(repr(r["duration_ms"])) if r["duration_ms"] is not None else 0
        cell[2] += r["records_written"]
        cell[3] += r["records_failed"]
    return [(*k, *v) for k, v in cells.items()]


def outcomes(plan: DetailPlan, runs: Mapping[str, Run]) -> list[tuple[Any, ...]]:
    cells: dict[tuple[str, str, str, int, str], list[Any]] = {}
    for o in plan.outcomes:
        r = runs.get(o.run_id)
        if r is None:
            continue
        cell = cells.setdefault((r["tenant_id"], r["environment"], r["flow_id"], o.flow_version, o.step),
                                [0, 0, 0, None])  # fmt: skip
        cell[("succeeded", "failed", "retried").index(o.kind)] += 1
        if o.kind == "failed":
            cell[3] = o.occurred_at if cell[3] is None else max(cell[3], o.occurred_at)
    return [(*k, *v) for k, v in cells.items()]


def endpoints(plan: DetailPlan, runs: Mapping[str, Run]) -> list[tuple[Any, ...]]:
    cells: dict[tuple[str, str, str, str, str, str], list[Any]] = {}
    for e in plan.endpoints:
        r = runs.get(e.run_id)
        if r is None:
            continue
        cell = cells.setdefault((r["tenant_id"], r["environment"], r["flow_id"], e.method, e.host, e.route),
                                [0, e.occurred_at])  # fmt: skip
        cell[0] += 1
        cell[1] = max(cell[1], e.occurred_at)
    return [(*k, *v) for k, v in cells.items()]
