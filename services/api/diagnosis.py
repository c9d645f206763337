"""A failed run's diagnosis, decided from signals the read models hold: which rules fired, with the values they saw,
the root-cause class they add up to, and a next action written from those values (docs/runs.md, Diagnosis). Pure:
`adapters/diagnosis.py` gathers the signals, `diagnose` decides."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.flows import RetryPolicy, mask_secrets
from schemas.status import ENDED_IN_ERROR, RunStatus
from services.api import diagnosis_advice as advice
from services.api.models import diagnosis as m
from services.common.runfold.fingerprint import fingerprint

# The runs a diagnosis is given for: every run that ended in error, and a PARTIAL run (records were rejected).
DIAGNOSED = frozenset(s.value for s in (*ENDED_IN_ERROR, RunStatus.PARTIAL))

# Step error codes (the executor's runners) that say the flow or its connector is set up wrong, not that the data
# or the upstream failed.
CONFIG_CODES = frozenset({
    "blocked_address", "invalid_dsn", "template_error", "secret_not_found", "secret_undecryptable",
    "unknown_connector", "connector_unusable", "unknown_topic", "reserved_topic", "unknown_function",
    "function_load_failed", "invalid_input", "parameter_count",
})  # fmt: skip
TIMEOUT_CODES = frozenset({"timeout", "flow_timeout", "human_input_timeout"})
DATA_CODES = frozenset({"assertion_failed", "extraction_failed", "invalid_input_schema"})
# Equal weights are broken in this order: the most specific class first.
ORDER: tuple[m.RootCause, ...] = (
    "flowtrail_bug", "auth_or_config", "timing_timeout", "data_validation", "upstream_service_error",
)  # fmt: skip
_HOST = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]+)")
# The same expression in SQL (adapters/diagnosis.py), so both sides extract the same host from a URL.
HOST_SQL_PATTERN = _HOST.pattern


def url_host(url: Any) -> str | None:
    """`https://user@API.example.com:8443/x?y` → `api.example.com:8443`."""
    found = _HOST.match(url) if isinstance(url, str) else None
    return found.group(1).lower() if found else None


def step_connector(step_input: Any) -> str | None:
    """The connector a step names (the executor's rule): `connector`, or that of its `source` or `destination`."""
    if not isinstance(step_input, Mapping):
        return None
    parts = [step_input] + [step_input.get(k) for k in ("source", "destination")]
    for part in parts:
        name = part.get("connector") if isinstance(part, Mapping) else None
        if isinstance(name, str) and name and "{{" not in name:
            return name
    return None


# ---------------------------------------------------------------- signals in


@dataclass(frozen=True)
class Attempt:
    attempt: int
    status: str
    error: Mapping[str, Any] | None = None
    duration_ms: float | None = None


@dataclass(frozen=True)
class PastRun:
    """One of the last N runs of the flow (the diagnosed run among them): its final error's fingerprint and the
    attempts of the diagnosed step in it."""

    id: str
    flow_version: int
    status: str
    created_at: datetime
    fingerprint: str | None = None
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class Version:
    """The diagnosed step's definition in one flow version, and the flow's own timeout and retry there."""

    step: Mapping[str, Any] | None
    flow_timeout_s: float | None = None
    flow_retry: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Signals:
    run_id: str
    flow_id: str
    flow_version: int
    status: str
    error: Mapping[str, Any] | None = None
    error_message: str | None = None
    failed_step: str | None = None
    fingerprint: str | None = None  # runs.error_fingerprint
    step_action: str | None = None
    attempts: tuple[Attempt, ...] = ()
    assertions: tuple[Mapping[str, Any], ...] = ()
    rejected: m.RejectedRecords | None = None
    last_n: int = 50
    past: tuple[PastRun, ...] = ()  # newest first, up to and including this run
    group_first_seen: datetime | None = None  # failure_groups.first_seen of the fingerprint
    versions: Mapping[int, Version] = field(default_factory=dict)
    dependency: m.DependencyHealth | None = None


# ---------------------------------------------------------------- the parts of a diagnosis


def failed_error(s: Signals) -> m.DiagnosedError:
    """The run's error, with the fingerprint the failure groups give it (computed alike when the run has none)."""
    e = s.error or {}
    rejected = f"{s.rejected.count} record(s) rejected, the first: {s.rejected.first_error}" if s.rejected else None
    message = str(e.get("message") or s.error_message or rejected or f"the run ended {s.status}")
    category = e.get("category")
    fp, pattern = (s.fingerprint, None)
    if category:
        computed, pattern = fingerprint(s.flow_id, s.failed_step, str(category), message)
        fp = fp or computed
    return m.DiagnosedError(category=category, code=e.get("code"), message=message, status_code=e.get("status_code"),
                            fingerprint=fp, message_pattern=pattern)  # fmt: skip


def _attempt_fingerprint(flow_id: str, step: str | None, a: Attempt) -> str | None:
    if not a.error or not a.error.get("category"):
        return None
    return fingerprint(flow_id, step, str(a.error["category"]), str(a.error.get("message") or ""))[0]


def _occurred(s: Signals, fp: str, run: PastRun) -> int | None:
    """The first attempt of the step in `run` that failed with `fp` (0 when only the run's final error has it)."""
    for a in sorted(run.attempts, key=lambda a: a.attempt):
        if a.status == "FAILED" and _attempt_fingerprint(s.flow_id, s.failed_step, a) == fp:
            return a.attempt
    return 0 if run.fingerprint == fp else None


def history(s: Signals, fp: str | None) -> m.History | None:
    if fp is None or not s.past:
        return None
    occurrences: list[PastRun] = []
    passed = 0
    for run in s.past:
        first = _occurred(s, fp, run)
        if first is None:
            continue
        occurrences.append(run)
        if first and any(a.status == "SUCCEEDED" and a.attempt > first for a in run.attempts):
            passed += 1
    oldest = min(occurrences, key=lambda r: (r.created_at, r.id), default=None)
    first_seen, first_run = (oldest.created_at, oldest.id) if oldest else (None, None)
    if s.group_first_seen is not None and (first_seen is None or s.group_first_seen < first_seen):
        first_seen, first_run = s.group_first_seen, None
    since = min((r.flow_version for r in occurrences), default=None)
    by_version = Counter(r.flow_version for r in s.past)
    hit = Counter(r.flow_version for r in occurrences)
    durations = [a.duration_ms for r in s.past if r.id != s.run_id for a in r.attempts
                 if a.status == "SUCCEEDED" and a.duration_ms is not None]  # fmt: skip
    return m.History(
        last_n=s.last_n, runs=len(s.past), occurrences=len(occurrences), passed_on_retry=passed,
        first_seen=first_seen, first_seen_run_id=first_run, since_version=since,
        appeared_with_version=since is not None and any(v < since for v in by_version),
        by_version=[m.VersionCount(version=v, runs=n, occurrences=hit[v]) for v, n in sorted(by_version.items())],
        step_median_success_ms=round(statistics.median(durations), 3) if durations else None,
    )  # fmt: skip


def step_change(s: Signals, h: m.History | None) -> m.StepChange | None:
    """When the fingerprint appeared with a version: what changed in the step (and the flow's timeout) then."""
    if h is None or not h.appeared_with_version or h.since_version is None:
        return None
    earlier = [v for v in s.versions if v < h.since_version]
    after = s.versions.get(h.since_version)
    if not earlier or after is None:
        return None
    before = s.versions[max(earlier)]
    changes: list[m.FieldChange] = []
    old_step, new_step = dict(before.step or {}), dict(after.step or {})
    if not old_step and new_step:  # the version added the step: one change, not one per field
        changes.append(m.FieldChange(field=f"steps.{s.failed_step}", before=None, after=mask_secrets(new_step)))
        old_step = new_step
    for name in sorted(set(old_step) | set(new_step)):
        if old_step.get(name) != new_step.get(name):
            changes.append(m.FieldChange(field=f"steps.{s.failed_step}.{name}", before=mask_secrets(old_step.get(name)),
                                         after=mask_secrets(new_step.get(name))))  # fmt: skip
    if before.flow_timeout_s != after.flow_timeout_s:
        changes.append(m.FieldChange(field="timeout_s", before=before.flow_timeout_s, after=after.flow_timeout_s))
    return m.StepChange(from_version=max(earlier), to_version=h.since_version, changes=changes)


def failed_step(s: Signals) -> m.FailedStep | None:
    if s.failed_step is None:
        return None
    here = s.versions.get(s.flow_version) or Version(step=None)
    definition = here.step or {}
    retry = definition.get("retry") or here.flow_retry
    delays = list((retry or {}).get("delays_s", RetryPolicy().delays_s))
    timeout = definition.get("timeout_s")
    return m.FailedStep(name=s.failed_step, action=s.step_action, attempts=max((a.attempt for a in s.attempts),
                        default=0), retry_delays_s=delays, timeout_s=timeout)  # fmt: skip


def assertion(s: Signals) -> m.AssertionMismatch | None:
    for a in s.assertions:
        if a.get("passed") is False:
            return m.AssertionMismatch(expression=str(a.get("expression")), operator=str(a.get("operator") or "eq"),
                                       expected=a.get("expected"), actual=a.get("actual"))  # fmt: skip
    return None


# ---------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Facts:
    """Everything the rules read, derived once."""

    s: Signals
    error: m.DiagnosedError
    step: m.FailedStep | None
    assertion: m.AssertionMismatch | None
    history: m.History | None
    change: m.StepChange | None

    @property
    def timeout_s(self) -> float | None:
        """The timeout that ran out: the flow's for a flow timeout, else the step's own (null: the executor's
        default)."""
        if self.error.code == "flow_timeout":
            here = self.s.versions.get(self.s.flow_version)
            return here.flow_timeout_s if here else None
        return self.step.timeout_s if self.step is not None else None


Rule = Callable[[Facts], list[m.Evidence]]


def _ev(rule: str, supports: m.RootCause, weight: int, says: str, **observed: Any) -> list[m.Evidence]:
    return [m.Evidence(rule=rule, supports=supports, weight=weight, observed=observed, says=says)]


def internal_error(f: Facts) -> list[m.Evidence]:
    if f.error.category == "INTERNAL" or f.s.status == "INTERNAL_ERROR":
        return _ev("internal_error", "flowtrail_bug", 10, "the error is Flowtrail's own (INTERNAL), not the flow's",
                   category=f.error.category, run_status=f.s.status)  # fmt: skip
    return []


def credentials_rejected(f: Facts) -> list[m.Evidence]:
    if f.error.category == "AUTH":
        return _ev("credentials_rejected", "auth_or_config", 6, "the upstream refused the credentials (AUTH)",
                   category=f.error.category, status_code=f.error.status_code)  # fmt: skip
    return []


def configuration_error(f: Facts) -> list[m.Evidence]:
    if f.error.code in CONFIG_CODES:
        return _ev("configuration_error", "auth_or_config", 6, f"the step is set up wrong ({f.error.code})",
                   code=f.error.code)  # fmt: skip
    if f.s.status == "QUOTA_EXCEEDED":
        return _ev("quota_exceeded", "auth_or_config", 6, "the tenant's quota refused the run",
                   run_status=f.s.status)  # fmt: skip
    return []


def connector_degraded(f: Facts) -> list[m.Evidence]:
    d = f.s.dependency
    if d is not None and d.kind == "connector" and d.status == "degraded":
        return _ev("connector_degraded", "auth_or_config", 3, f"connector {d.name} was degraded (auth or quota errors)",
                   connector=d.name, degraded_since=d.degraded_since)  # fmt: skip
    return []


def timed_out(f: Facts) -> list[m.Evidence]:
    if f.error.code in TIMEOUT_CODES or f.s.status == "TIMED_OUT":
        out = _ev("timed_out", "timing_timeout", 6, "the step or the run ran out of time",
                  code=f.error.code, run_status=f.s.status, timeout_s=f.timeout_s)  # fmt: skip
        median = f.history.step_median_success_ms if f.history else None
        if median is not None and f.timeout_s is not None and median >= f.timeout_s * 1000 * 0.66:
            out += _ev("timeout_below_usual_duration", "timing_timeout", 2,
                       "the step's successful attempts usually take about as long as its timeout, or longer",
                       median_success_ms=median, timeout_s=f.timeout_s)  # fmt: skip
        return out
    return []


def assertion_failed(f: Facts) -> list[m.Evidence]:
    a = f.assertion
    if f.error.code == "assertion_failed" or a is not None:
        return _ev("assertion_failed", "data_validation", 6, "an assertion on the step's output did not hold",
                   expression=a.expression if a else None, operator=a.operator if a else None,
                   expected=a.expected if a else None, actual=a.actual if a else None)  # fmt: skip
    return []


def invalid_data(f: Facts) -> list[m.Evidence]:
    category, code = f.error.category, f.error.code
    if category == "VALIDATION" and code not in CONFIG_CODES and code != "assertion_failed":
        return _ev("invalid_data", "data_validation", 5, "the request or its data was refused as invalid",
                   category=category, code=code, status_code=f.error.status_code)  # fmt: skip
    if category == "CONFLICT":
        return _ev("conflicting_record", "data_validation", 4, "the destination holds a conflicting record",
                   category=category, status_code=f.error.status_code)  # fmt: skip
    if f.s.status == "INVALID":
        return _ev("invalid_input", "data_validation", 6, "the run's input was refused before it ran",
                   run_status=f.s.status)  # fmt: skip
    return []


def records_rejected(f: Facts) -> list[m.Evidence]:
    r = f.s.rejected
    if r is not None and r.count > 0:
        return _ev("records_rejected", "data_validation", 4, f"the destination rejected {r.count} record(s)",
                   count=r.count, first_key=r.first_key, first_field_path=r.first_field_path)  # fmt: skip
    return []


def upstream_unavailable(f: Facts) -> list[m.Evidence]:
    if f.error.category == "TRANSIENT" and f.error.code not in TIMEOUT_CODES:
        return _ev("upstream_unavailable", "upstream_service_error", 5,
                   "the upstream was unavailable (a 5xx, a 429, or no connection)",
                   category=f.error.category, code=f.error.code, status_code=f.error.status_code)  # fmt: skip
    return []


def dependency_failing(f: Facts) -> list[m.Evidence]:
    d = f.s.dependency
    if d is None or d.failures < 2 or d.failures <= d.successes:
        return []
    auth = d.failure_categories.get("AUTH", 0)
    supports: m.RootCause = "auth_or_config" if auth * 2 > d.failures else "upstream_service_error"
    return _ev("dependency_failing_for_others", supports, 3,
               f"{d.kind} {d.name} failed for other runs too, more often than it succeeded",
               kind=d.kind, name=d.name, failures=d.failures, successes=d.successes, failed_runs=d.failed_runs,
               categories=dict(d.failure_categories))  # fmt: skip


def passed_on_retry(f: Facts) -> list[m.Evidence]:
    h = f.history
    if h is None or h.passed_on_retry == 0:
        return []
    supports: m.RootCause = "timing_timeout" if f.error.code in TIMEOUT_CODES else "upstream_service_error"
    return _ev("passed_on_retry_elsewhere", supports, 2,
               "the same error went away on a later attempt in other runs: it is intermittent",
               occurrences=h.occurrences, passed_on_retry=h.passed_on_retry, runs=h.runs)  # fmt: skip


# A field of the step that changed when the error appeared, and the class such a change points to.
_CHANGED_FIELD_CLASS: tuple[tuple[str, m.RootCause], ...] = (
    ("timeout_s", "timing_timeout"), ("assertions", "data_validation"), ("extract", "data_validation"),
    ("input", "auth_or_config"), ("action", "auth_or_config"), ("retry", "auth_or_config"),
)  # fmt: skip


def changed_with_version(f: Facts) -> list[m.Evidence]:
    if f.change is None:
        return []
    out: list[m.Evidence] = []
    for suffix, supports in _CHANGED_FIELD_CLASS:
        hits = [c for c in f.change.changes if c.field.endswith("." + suffix) or c.field == suffix]
        if hits and not any(e.supports == supports for e in out):
            out += _ev("changed_with_version", supports, 3,
                       f"the error appeared with version {f.change.to_version}, which changed {hits[0].field}",
                       from_version=f.change.from_version, to_version=f.change.to_version,
                       fields={c.field: {"before": c.before, "after": c.after} for c in hits})  # fmt: skip
    return out


def unclassified(f: Facts) -> list[m.Evidence]:
    if f.error.category is None and f.s.status in ("FAILED", "TIMED_OUT") and f.s.rejected is None:
        return _ev("unclassified_failure", "flowtrail_bug", 1,
                   "the run failed without a classified error: Flowtrail records one for every failure",
                   run_status=f.s.status, message=f.error.message)  # fmt: skip
    return []


RULES: tuple[Rule, ...] = (
    internal_error, credentials_rejected, configuration_error, connector_degraded, timed_out, assertion_failed,
    invalid_data, records_rejected, upstream_unavailable, dependency_failing, passed_on_retry, changed_with_version,
    unclassified,
)  # fmt: skip


def decide(evidence: Sequence[m.Evidence]) -> tuple[m.RootCause, dict[str, int]]:
    """The root cause the evidence weighs most for; equal weights go to the earlier class in ORDER."""
    scores: dict[str, int] = {}
    for e in evidence:
        scores[e.supports] = scores.get(e.supports, 0) + e.weight
    if not scores:
        return "flowtrail_bug", {}
    return min(ORDER, key=lambda c: (-scores.get(c, 0), ORDER.index(c))), scores


# ---------------------------------------------------------------- all together


def diagnose(s: Signals) -> m.Diagnosis:
    error = failed_error(s)
    h = history(s, error.fingerprint)
    facts = Facts(s, error, failed_step(s), assertion(s), h, step_change(s, h))
    evidence = [e for rule in RULES for e in rule(facts)]
    cause, scores = decide(evidence)
    return m.Diagnosis(
        step=facts.step, error=error, assertion=facts.assertion, rejected_records=s.rejected, history=h,
        step_change=facts.change, dependency=s.dependency, root_cause=cause, scores=scores, evidence=evidence,
        next_action=advice.next_action(cause, facts, {e.rule for e in evidence}).strip(),
    )  # fmt: skip


def not_failed(status: str) -> str:
    """Why a run has no diagnosis."""
    if status == "SUCCEEDED":
        return "the run succeeded: nothing to diagnose"
    if status == "CANCELED":
        return "the run was canceled, it did not fail: nothing to diagnose"
    return f"the run is {status} and has not failed (yet): nothing to diagnose"
