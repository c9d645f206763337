"""Alert rules as a pure fold: (rule, state, finished run) → (state, fire/resolve actions); channel payloads.

Everything here is a function of event times, so replaying the same ledger derives the same alert history;
only the no_success clock reads the wall clock, and what it fires is dated by event time too (the moment
the silence began to count), with the same id a replay gives it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from services.common import slo_burn

KINDS = ("failed_run", "consecutive_partial", "no_success", "failure_rate", "slo_burn")
TENANT_WIDE = slo_burn.TENANT_WIDE
# Kinds whose open alert is resolved by their own measure, not by the flow's next success.
_SELF_RESOLVING = frozenset({"failure_rate", "slo_burn"})
FAILED = frozenset({"FAILED", "TIMED_OUT", "INTERNAL_ERROR"})
# The outcomes of a flow's work. CANCELED, INVALID and QUOTA_EXCEEDED say nothing about the flow's health:
# they neither break a streak nor count in a failure rate.
OUTCOMES = FAILED | {"SUCCEEDED", "PARTIAL"}
_NS = uuid.UUID("5d0c8f4e-3b7a-4e55-9a8e-7f2c1d6b9e30")


@dataclass(frozen=True, slots=True)
class Revision:
    """A rule's evaluated settings from `since` on (until the next revision)."""

    since: datetime
    enabled: bool
    params: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(), "enabled": self.enabled, "params": self.params}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Revision:
        return cls(datetime.fromisoformat(data["since"]), bool(data["enabled"]), dict(data["params"]))


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    tenant_id: str
    environment: str
    flow_id: str
    kind: str
    name: str
    revisions: tuple[Revision, ...]

    def in_force(self, at: datetime) -> Revision | None:
        """The revision that judges a run finished at `at`: none before the rule existed or while disabled."""
        current = None
        for revision in self.revisions:
            if revision.since > at:
                break
            current = revision
        return current if current is not None and current.enabled else None


@dataclass(frozen=True, slots=True)
class State:
    consecutive: int = 0
    last_success_at: datetime | None = None
    last_success_run_id: str | None = None
    open: bool = False
    window: tuple[tuple[datetime, bool], ...] = ()
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """A run that reached a terminal status, with what an alert shows about it."""

    run_id: str
    status: str
    at: datetime
    flow_name: str = ""
    error_message: str | None = None
    failed_step: str | None = None
    flow_id: str = ""


@dataclass(frozen=True, slots=True)
class Fire:
    key: str  # unique per rule: the alert's id is derived from it
    at: datetime
    run_id: str | None
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Resolve:
    at: datetime
    run_id: str | None


Action = Fire | Resolve


def alert_id(rule_id: str, key: str) -> str:
    return "alr_" + uuid.uuid5(_NS, f"{rule_id}:{key}").hex[:20]


def delivery_id(alert: str, action: str, channel_index: int) -> str:
    return "ald_" + uuid.uuid5(_NS, f"{alert}:{action}:{channel_index}").hex[:20]


def step(
    rule: Rule, state: State, run: Finished, counts: Mapping[float, slo_burn.Counts] | None = None
) -> tuple[State, list[Action]]:
    """Fold one finished run of the rule's flow into its state. Every kind resolves its open alert on the
    flow's next success, except failure_rate, which resolves when the rate drops back under the threshold, and
    slo_burn, which resolves when no window pair burns (`counts`: its windows' runs, ending at this run)."""
    actions: list[Action] = []
    if rule.kind == "no_success":
        # The silence may have crossed the limit before this run, perhaps under an earlier revision.
        state, silent = overdue(rule, state, run.at)
        actions += silent
    revision = rule.in_force(run.at)
    if revision is None or run.status not in OUTCOMES:
        return state, actions
    p = revision.params
    succeeded = run.status == "SUCCEEDED"
    if rule.kind == "failed_run" and run.status in FAILED:
        reason = f"run {run.run_id} of flow {rule.flow_id} ended {run.status}"
        if run.error_message:
            reason += f": {run.error_message}"
        actions.append(Fire(f"run:{run.run_id}", run.at, run.run_id, reason, _run_details(run)))
        state = replace(state, open=True)
    elif rule.kind == "consecutive_partial":
        count = state.consecutive + 1 if run.status == "PARTIAL" else 0
        if count == p["n"] and not state.open:
            reason = f"{count} consecutive PARTIAL runs of flow {rule.flow_id}"
            details = {**_run_details(run), "consecutive": count}
            actions.append(Fire(f"streak:{run.run_id}", run.at, run.run_id, reason, details))
            state = replace(state, open=True)
        state = replace(state, consecutive=count)
    elif rule.kind == "failure_rate":
        state, burn = _burn(rule, state, run, p)
        actions += burn
    elif rule.kind == "slo_burn" and counts is not None:
        state, burn = _slo(rule, state, run, p, counts)
        actions += burn
    if succeeded and state.open and rule.kind not in _SELF_RESOLVING:
        actions.append(Resolve(run.at, run.run_id))
        state = replace(state, open=False)
    if succeeded:
        state = replace(state, last_success_at=run.at, last_success_run_id=run.run_id)
    return replace(state, updated_at=run.at), actions


def overdue(rule: Rule, state: State, until: datetime) -> tuple[State, list[Fire]]:
    """no_success: fire once `minutes` passed with no success, counted from the last success or from when
    the revision took effect, whichever is later — dated when the silence crossed the limit, not when it was
    noticed, and judged by the revision in force at that moment. The clock asks with `until` = now; a batch
    asks with the time of the next run, so a replay finds the same silences."""
    if rule.kind != "no_success" or state.open:
        return state, []
    revisions = rule.revisions
    for i, revision in enumerate(revisions):
        if not revision.enabled or revision.since > until:
            continue
        base = revision.since if state.last_success_at is None else max(state.last_success_at, revision.since)
        minutes = revision.params["minutes"]
        deadline = base + timedelta(minutes=minutes)
        if deadline > until or (i + 1 < len(revisions) and deadline >= revisions[i + 1].since):
            continue
        last = state.last_success_at
        since = f"its last success at {last.isoformat()}" if last and last >= revision.since else "the rule took effect"
        reason = f"no successful run of flow {rule.flow_id} in {minutes:g} min (since {since})"
        details = {"flow_id": rule.flow_id, "minutes": minutes, "silent_since": base.isoformat(),
                   "last_success_run_id": state.last_success_run_id}  # fmt: skip
        fire = Fire(f"silence:{base.isoformat()}", deadline, state.last_success_run_id, reason, details)
        return replace(state, open=True), [fire]
    return state, []


def _burn(rule: Rule, state: State, run: Finished, p: dict[str, Any]) -> tuple[State, list[Action]]:
    """failure_rate: failures / finished runs of the flow over the sliding window ending at this run."""
    start = run.at - timedelta(minutes=p["window_minutes"])
    window = (*(w for w in state.window if w[0] > start), (run.at, run.status in FAILED))
    failed = sum(1 for _, f in window if f)
    rate = failed / len(window)
    state = replace(state, window=window)
    burning = len(window) >= p["min_runs"] and rate >= p["threshold"]
    if burning and not state.open:
        reason = (f"{failed} of {len(window)} runs of flow {rule.flow_id} failed in {p['window_minutes']:g} min "
                  f"({rate:.0%} ≥ {p['threshold']:.0%})")  # fmt: skip
        details = {**_run_details(run), "failed": failed, "runs": len(window), "failure_rate": round(rate, 4),
                   "threshold": p["threshold"], "window_minutes": p["window_minutes"]}  # fmt: skip
        return replace(state, open=True), [Fire(f"burn:{run.run_id}", run.at, run.run_id, reason, details)]
    if state.open and rate < p["threshold"]:
        return replace(state, open=False), [Resolve(run.at, run.run_id)]
    return state, []


def _slo(
    rule: Rule, state: State, run: Finished, p: dict[str, Any], counts: Mapping[float, slo_burn.Counts]
) -> tuple[State, list[Action]]:
    """slo_burn: page when a window pair burns the error budget too fast (services/common/slo_burn.py)."""
    decision = slo_burn.decide(p["objective"], p, counts)
    if decision.burning and not state.open:
        pair = decision.pair
        assert pair is not None
        rates = decision.rates
        scope = "the tenant's flows are" if rule.flow_id == TENANT_WIDE else f"flow {rule.flow_id} is"
        reason = (f"{scope} burning the {p['objective']:.4g} objective's error budget "
                  f"{rates[pair.long_minutes]:.3g}x over {pair.long_minutes:g} min and "
                  f"{rates[pair.short_minutes]:.3g}x over {pair.short_minutes:g} min ({pair.label})")  # fmt: skip
        details = {**_run_details(run), **({"flow_id": run.flow_id} if rule.flow_id == TENANT_WIDE else {}),
                   "objective": p["objective"], "period_days": p["period_days"],
                   "pair": {"long_minutes": pair.long_minutes, "short_minutes": pair.short_minutes,
                            "factor": pair.factor},
                   "windows": {f"{m:g}": {"failed": c.failed, "runs": c.total,
                                          "burn_rate": round(decision.rates[m], 4)}
                               for m, c in sorted(counts.items())}}  # fmt: skip
        return replace(state, open=True), [Fire(f"slo:{run.run_id}", run.at, run.run_id, reason, details)]
    if state.open and not decision.burning:
        return replace(state, open=False), [Resolve(run.at, run.run_id)]
    return state, []


def _run_details(run: Finished) -> dict[str, Any]:
    return {"run_id": run.run_id, "status": run.status, "flow_name": run.flow_name, "finished_at": run.at.isoformat(),
            "error_message": run.error_message, "failed_step": run.failed_step}  # fmt: skip


# ---- channel payloads -------------------------------------------------------------------------------------


def render(channel: dict[str, Any], action: str, alert: dict[str, Any], rule: Rule, delivery: str) -> dict[str, Any]:
    """The body one channel gets for one alert firing ('trigger') or resolving ('resolve')."""
    kind = channel["type"]
    if kind == "slack":
        return _slack(action, alert, rule)
    if kind == "pagerduty":
        return _pagerduty(channel, action, alert, rule)
    if kind == "email":
        return _email(action, alert, rule)
    event = "alert.fired" if action == "trigger" else "alert.resolved"
    at = alert["fired_at"] if action == "trigger" else alert["resolved_at"]
    return {"id": delivery, "event": event, "created_at": at, "data": {"alert": alert, "rule": _rule_summary(rule)}}


def _headline(action: str, alert: dict[str, Any], rule: Rule) -> str:
    state = "FIRING" if action == "trigger" else "RESOLVED"
    return f"[{state}] {rule.name}: {alert['reason']}"


def _slack(action: str, alert: dict[str, Any], rule: Rule) -> dict[str, Any]:
    text = _headline(action, alert, rule)
    facts = [f"*Flow:* `{rule.flow_id}`", f"*Rule:* {rule.kind}", f"*Fired:* {alert['fired_at']}"]
    if alert.get("run_id"):
        facts.append(f"*Run:* `{alert['run_id']}`")
    if action == "resolve":
        facts.append(f"*Resolved:* {alert['resolved_at']}")
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f} for f in facts]},
        ],
    }


def _pagerduty(channel: dict[str, Any], action: str, alert: dict[str, Any], rule: Rule) -> dict[str, Any]:
    """PagerDuty Events API v2: one incident per alert (dedup_key = alert id), resolved with the same key."""
    body: dict[str, Any] = {"routing_key": channel["routing_key"], "dedup_key": alert["id"]}
    if action == "resolve":
        return {**body, "event_action": "resolve"}
    return {
        **body,
        "event_action": "trigger",
        "payload": {
            "summary": f"{rule.name}: {alert['reason']}"[:1024],
            "source": f"flowtrail/{rule.tenant_id}/{rule.flow_id}",
            "severity": channel.get("severity", "error"),
            "timestamp": alert["fired_at"],
            "component": rule.flow_id,
            "group": rule.environment,
            "class": rule.kind,
            "custom_details": {"rule_id": rule.id, "run_id": alert.get("run_id"), **alert["payload"]},
        },
    }


def _email(action: str, alert: dict[str, Any], rule: Rule) -> dict[str, Any]:
    lines = [alert["reason"], "", f"Rule:  {rule.name} ({rule.kind}, {rule.id})", f"Flow:  {rule.flow_id}",
             f"Fired: {alert['fired_at']}"]  # fmt: skip
    if alert.get("run_id"):
        lines.append(f"Run:   {alert['run_id']}")
    if action == "resolve":
        lines.append(f"Resolved: {alert['resolved_at']}" + (f" by run {alert['resolved_by_run_id']}"
                                                            if alert.get("resolved_by_run_id") else ""))  # fmt: skip
    lines += ["", f"Alert id: {alert['id']}"]
    subject = f"[Flowtrail] {'FIRING' if action == 'trigger' else 'RESOLVED'}: {rule.name} ({rule.flow_id})"
    return {"subject": subject, "text": "\n".join(lines) + "\n"}


def _rule_summary(rule: Rule) -> dict[str, Any]:
    return {"id": rule.id, "name": rule.name, "kind": rule.kind, "flow_id": rule.flow_id}
