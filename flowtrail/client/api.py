"""What each call of the client sends and what it answers, written once for `Client` and `AsyncClient`: each
method returns a plan (flowtrail/client/plan.py) that a driver runs. The routes are the API's (docs/runs.md,
docs/flows.md, docs/tenants.md, docs/api-contract.md); the answers its own models (flowtrail/client/models.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypedDict
from urllib.parse import quote

from typing_extensions import Unpack

from flowtrail.client import models as m
from flowtrail.client.errors import NotFound, WaitTimeout
from flowtrail.client.plan import (
    Call,
    Context,
    Items,
    M,
    Plan,
    ServerEvent,
    Sleep,
    by_status,
    model,
    new_idempotency_key,
    pages,
    raw,
    result,
    server_events,
)
from schemas.status import TERMINAL_RUN_STATUSES

if TYPE_CHECKING:
    import httpx

    from services.common.triggering import BatchAccepted, LiveResult, TriggerAccepted

TERMINAL = frozenset(s.value for s in TERMINAL_RUN_STATUSES)
Mode = Literal["async", "schedule"]


def _seg(value: str) -> str:
    """A path segment: an id as the API sees it, whatever characters it holds."""
    return quote(value, safe="")


class _Spec:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _call(self, call: Call[Any]) -> Plan[Any]:
        return result(self.ctx, call)


# ---------------------------------------------------------------- triggers and the launch API


class _TriggerAnswers:
    """The intake's answer models, imported when a trigger is first sent (see flowtrail/client/models.py)."""

    @staticmethod
    def accepted(response: httpx.Response) -> TriggerAccepted:
        return m.TriggerAccepted.model_validate_json(response.content)

    @staticmethod
    def batch(response: httpx.Response) -> BatchAccepted:
        return m.BatchAccepted.model_validate_json(response.content)

    @staticmethod
    def live(response: httpx.Response) -> LiveResult:
        return m.LiveResult.model_validate_json(response.content)


class Origin(TypedDict, total=False):
    """Where a trigger says it comes from (docs/intake.md#manual-triggers-and-nested-runs)."""

    manual: bool  # X-Flowtrail-Trigger: manual (trigger type `manual`, the key as caller)
    parent_run_id: str  # ap-parent-run-id: a nested run of that run
    fail_parent_on_failure: bool  # ap-fail-parent-on-failure (with parent_run_id)
    headers: Mapping[str, str]  # any other header


def _origin_headers(origin: Origin) -> dict[str, str]:
    headers = dict(origin.get("headers") or {})
    if origin.get("manual"):
        headers["X-Flowtrail-Trigger"] = "manual"
    if origin.get("parent_run_id"):
        headers["ap-parent-run-id"] = origin["parent_run_id"]
    if "fail_parent_on_failure" in origin:
        headers["ap-fail-parent-on-failure"] = "true" if origin["fail_parent_on_failure"] else "false"
    return headers


class TriggersApi(_Spec):
    """`POST /v1/flows/{id}/trigger` (sent to ingest when the client has its URL) and the launch API's
    `POST /v1/actions/{name}/async|live`. Every call carries an Idempotency-Key, `idempotency_key` or a new one,
    the same on each retry: the API derives the run ids from it, so a retried request names the same runs."""

    def _send(
        self,
        path: str,
        body: dict[str, Any],
        parse: Any,
        key: str | None,
        origin: Origin,
        timeout_s: float | None = None,
    ) -> Plan[Any]:
        call = Call(
            "POST",
            path,
            parse,
            body={k: v for k, v in body.items() if v is not None},
            service="ingest",
            headers=_origin_headers(origin),
            idempotency_key=key or new_idempotency_key(),
            timeout_s=timeout_s,
        )
        return self._call(call)

    def trigger(
        self,
        flow_id: str,
        input: Any = None,
        *,
        mode: Mode = "async",
        flow_version: int | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
        **origin: Unpack[Origin],
    ) -> Plan[TriggerAccepted]:
        """One run of the flow with `input`: 202, QUEUED (SCHEDULED with `run_at`)."""
        body = {"mode": mode, "input": input, "flow_version": flow_version, "run_at": run_at}
        return self._send(f"/v1/flows/{_seg(flow_id)}/trigger", body, _TriggerAnswers.accepted, idempotency_key, origin)

    def trigger_many(
        self,
        flow_id: str,
        inputs: Sequence[Any],
        *,
        mode: Mode = "async",
        flow_version: int | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
        **origin: Unpack[Origin],
    ) -> Plan[BatchAccepted]:
        """One run per input (up to 100,000), in input order."""
        body = {"mode": mode, "inputs": list(inputs), "flow_version": flow_version, "run_at": run_at}
        return self._send(f"/v1/flows/{_seg(flow_id)}/trigger", body, _TriggerAnswers.batch, idempotency_key, origin)

    def trigger_live(
        self,
        flow_id: str,
        input: Any = None,
        *,
        flow_version: int | None = None,
        idempotency_key: str | None = None,
        timeout_s: float = 90.0,
        **origin: Unpack[Origin],
    ) -> Plan[LiveResult]:
        """One run, answered when it ends (its output or error), or with its current status when the API's live
        timeout (FLOWTRAIL_API_LIVE_TIMEOUT_S, 30 s by default) passes first. `timeout_s`: how long this request
        may take."""
        body = {"mode": "live", "input": input, "flow_version": flow_version}
        return self._send(
            f"/v1/flows/{_seg(flow_id)}/trigger", body, _TriggerAnswers.live, idempotency_key, origin, timeout_s
        )

    def trigger_and_wait(
        self,
        flow_id: str,
        input: Any = None,
        *,
        timeout_s: float = 600.0,
        idempotency_key: str | None = None,
        **origin: Unpack[Origin],
    ) -> Plan[m.RunDetail]:
        """Trigger one run and wait for its final status (RunsApi.wait); its detail."""
        accepted = yield from self.trigger(flow_id, input, idempotency_key=idempotency_key, **origin)
        return (yield from RunsApi(self.ctx).wait(accepted.run_id, timeout_s=timeout_s))

    def launch(
        self,
        action_name: str,
        input: Any = None,
        *,
        flow_version: int | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> Plan[TriggerAccepted]:
        """The launch API: one run of the flow with that id or `action_name`, answered at once."""
        body = {"input": input, "flow_version": flow_version, "run_at": run_at}
        return self._send(f"/v1/actions/{_seg(action_name)}/async", body, _TriggerAnswers.accepted, idempotency_key, {})

    def launch_many(
        self,
        action_name: str,
        inputs: Sequence[Any],
        *,
        flow_version: int | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> Plan[BatchAccepted]:
        body = {"inputs": list(inputs), "flow_version": flow_version, "run_at": run_at}
        return self._send(f"/v1/actions/{_seg(action_name)}/async", body, _TriggerAnswers.batch, idempotency_key, {})

    def launch_live(
        self,
        action_name: str,
        input: Any = None,
        *,
        flow_version: int | None = None,
        idempotency_key: str | None = None,
        timeout_s: float = 90.0,
    ) -> Plan[LiveResult]:
        body = {"input": input, "flow_version": flow_version}
        return self._send(
            f"/v1/actions/{_seg(action_name)}/live", body, _TriggerAnswers.live, idempotency_key, {}, timeout_s
        )


# ---------------------------------------------------------------- runs


class RunFilters(TypedDict, total=False):
    """The filters of GET /v1/runs (docs/runs.md); a list matches any of its values."""

    flow_id: str | Sequence[str]
    status: str | Sequence[str]
    trigger_type: str | Sequence[str]
    execution_mode: str | Sequence[str]
    caller: str | Sequence[str]
    ids: list[str]
    tags: list[str]
    failed_step: str
    created_after: datetime
    created_before: datetime
    q: str
    error_fingerprint: str
    include_archived: bool
    bulk_operation_id: str
    retry_of: str
    sort: str


class BulkFilters(TypedDict, total=False):
    """The bulk filter (docs/api-contract.md): `ids`, or at least one of the others."""

    ids: list[str]
    exclude_ids: list[str]
    flow_id: str | Sequence[str]
    statuses: list[str]
    failed_step: str
    caller: str
    created_after: datetime
    created_before: datetime
    include_archived: bool
    dry_run: bool


def _after_seq(call: Call[Any], page: Any) -> Call[Any] | None:
    """The next page of a run's lines in seq order, or None after the last."""
    if not page.has_more or not page.data:
        return None
    return replace(call, params={**(call.params or {}), "after_seq": page.data[-1].seq})


def _cursor(call: Call[Any], cursor: str | None, name: str = "cursor") -> Call[Any] | None:
    return None if cursor is None else replace(call, params={**(call.params or {}), name: cursor})


class RunsApi(_Spec):
    """Runs: read, list, follow live, wait for, and act on (docs/runs.md)."""

    def get(self, run_id: str, *, as_of: int | datetime | None = None) -> Plan[m.RunDetail]:
        """The run with its trigger, steps and attempts; `as_of` (a seq or a time): as it stood then."""
        return self._call(Call("GET", f"/v1/runs/{_seg(run_id)}", model(m.RunDetail), params={"as_of": as_of}))

    def steps(self, run_id: str) -> Plan[list[m.RunStep]]:
        """The run's steps (from its detail: the API has no route of their own)."""
        return (yield from self.get(run_id)).steps

    def _list_call(self, limit: int, filters: RunFilters) -> Call[m.RunsPage]:
        return Call("GET", "/v1/runs", model(m.RunsPage), params={**filters, "limit": limit})

    def list(self, *, limit: int = 20, cursor: str | None = None, **filters: Unpack[RunFilters]) -> Plan[m.RunsPage]:
        """One page, newest first unless `sort` says otherwise; `next_cursor` names the next."""
        call = self._list_call(limit, filters)
        return self._call(_cursor(call, cursor) or call)

    def iter(self, *, page_size: int = 100, **filters: Unpack[RunFilters]) -> Items[m.RunSummary]:
        """Every matching run, page after page by cursor (stable while new runs arrive)."""
        first = self._list_call(page_size, filters)
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _cursor(first, p.next_cursor)))

    def events(self, run_id: str, *, after_seq: int = -1, limit: int = 1000) -> Plan[m.RunEvents]:
        """One page of the run's ledger in seq order."""
        params = {"after_seq": after_seq, "limit": limit}
        return self._call(Call("GET", f"/v1/runs/{_seg(run_id)}/events", model(m.RunEvents), params=params))

    def iter_events(self, run_id: str, *, after_seq: int = -1, page_size: int = 1000) -> Items[m.RunEvent]:
        """Every event of the run recorded so far, in seq order."""
        first: Call[m.RunEvents] = Call(
            "GET",
            f"/v1/runs/{_seg(run_id)}/events",
            model(m.RunEvents),
            params={"after_seq": after_seq, "limit": page_size},
        )
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _after_seq(first, p)))

    def logs(
        self, run_id: str, *, level: str | None = None, step: str | None = None, after_seq: int = -1, limit: int = 500
    ) -> Plan[m.RunLogs]:
        params = {"level": level, "step": step, "after_seq": after_seq, "limit": limit}
        return self._call(Call("GET", f"/v1/runs/{_seg(run_id)}/logs", model(m.RunLogs), params=params))

    def iter_logs(
        self, run_id: str, *, level: str | None = None, step: str | None = None, page_size: int = 500
    ) -> Items[m.LogLine]:
        """Every log line of the run (`level`: a minimum), in seq order."""
        first: Call[m.RunLogs] = Call(
            "GET",
            f"/v1/runs/{_seg(run_id)}/logs",
            model(m.RunLogs),
            params={"level": level, "step": step, "limit": page_size},
        )
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _after_seq(first, p)))

    def iter_record_errors(self, run_id: str, *, step: str | None = None, page_size: int = 500) -> Items[m.RecordError]:
        """Each record the run's steps rejected, with its key, field path and the destination's error."""
        first: Call[m.RunRecordErrors] = Call(
            "GET",
            f"/v1/runs/{_seg(run_id)}/record-errors",
            model(m.RunRecordErrors),
            params={"step": step, "limit": page_size},
        )
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _after_seq(first, p)))

    def diagnosis(self, run_id: str, *, last_n: int = 50) -> Plan[m.RunDiagnosis]:
        """Why the run failed: the failing step, its history, the dependency's health, a root cause, a next action."""
        call = Call("GET", f"/v1/runs/{_seg(run_id)}/diagnosis", model(m.RunDiagnosis), params={"last_n": last_n})
        return self._call(call)

    def stream(self, run_id: str, *, after_seq: int | None = None) -> Items[m.StreamEvent]:
        """The run's events live (`GET /v1/runs/{id}/stream`), from the first (or after `after_seq`) to its final
        status, where the stream ends; a dropped connection resumes after the last event seen."""
        call: Call[httpx.Response] = Call(
            "GET",
            f"/v1/runs/{_seg(run_id)}/stream",
            raw,
            stream=True,
            params={"after_seq": after_seq},
            headers={"Accept": "text/event-stream"},
        )
        return Items(server_events(self.ctx, call, _resume, _data(m.StreamEvent)))

    def watch(
        self,
        *,
        flow_id: str | Sequence[str] | None = None,
        status: str | Sequence[str] | None = None,
        last_event_id: str | None = None,
    ) -> Items[m.RunSummary]:
        """Status changes of the key's runs as they happen (`GET /v1/stream`), from now or after
        `last_event_id`; it does not end by itself."""
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        call: Call[httpx.Response] = Call(
            "GET", "/v1/stream", raw, stream=True, headers=headers, params={"flow_id": flow_id, "status": status}
        )
        return Items(server_events(self.ctx, call, _resume, _data(m.RunSummary)))

    def wait(
        self, run_id: str, *, timeout_s: float = 600.0, statuses: Sequence[str] | None = None
    ) -> Plan[m.RunDetail]:
        """Poll the run until its status is final (or one of `statuses`); its detail. A 404 is waited out (a run
        accepted by ingest may not be visible through this API yet). WaitTimeout when `timeout_s` passes first."""
        wanted = frozenset(statuses) if statuses is not None else TERMINAL
        deadline = time.monotonic() + timeout_s
        delay, seen = 0.1, None
        while True:
            try:
                seen = yield from self.get(run_id)
            except NotFound:
                pass
            else:
                if seen.status in wanted:
                    return seen
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"run {run_id} did not end within {timeout_s:g} s", run=seen)
            yield Sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 1.0)

    # ------------------------------------------------------------ actions

    def _action(self, path: str, parse: Any, body: Any, key: str | None) -> Plan[Any]:
        return self._call(Call("POST", path, parse, body=body, idempotency_key=key or new_idempotency_key()))

    def retry(
        self,
        run_id: str,
        *,
        strategy: Literal["FROM_FAILED_STEP", "ON_LATEST_VERSION"] = "FROM_FAILED_STEP",
        idempotency_key: str | None = None,
    ) -> Plan[m.RetryAccepted]:
        """A new run linked by `retry_of`; the same key names the same new run."""
        return self._action(
            f"/v1/runs/{_seg(run_id)}/retry", model(m.RetryAccepted), {"strategy": strategy}, idempotency_key
        )

    def cancel(self, run_id: str, *, reason: str = "", idempotency_key: str | None = None) -> Plan[m.ActionAccepted]:
        return self._action(
            f"/v1/runs/{_seg(run_id)}/cancel", model(m.ActionAccepted), {"reason": reason}, idempotency_key
        )

    def resume(self, run_id: str, input: Any = None, *, idempotency_key: str | None = None) -> Plan[m.ResumeAccepted]:
        """A PAUSED run's pending request answered with `input`, or a STOPPED run continued by a new run."""
        return self._action(
            f"/v1/runs/{_seg(run_id)}/resume",
            model(m.ResumeAccepted),
            {"input": input} if input is not None else {},
            idempotency_key,
        )

    def archive(self, run_id: str, *, idempotency_key: str | None = None) -> Plan[m.ActionAccepted | m.AlreadyArchived]:
        parse = by_status({202: m.ActionAccepted, 200: m.AlreadyArchived})
        return self._action(f"/v1/runs/{_seg(run_id)}/archive", parse, None, idempotency_key)

    def _bulk(self, action: str, extra: dict[str, Any], key: str | None, filters: BulkFilters) -> Plan[m.BulkResult]:
        return self._action(f"/v1/runs/bulk/{action}", model(m.BulkResult), {**filters, **extra}, key)

    def bulk_retry(
        self, *, strategy: str = "FROM_FAILED_STEP", idempotency_key: str | None = None, **filters: Unpack[BulkFilters]
    ) -> Plan[m.BulkResult]:
        """Retry every matching run (at most 10,000); with the same key a repeat is the same bulk operation."""
        return self._bulk("retry", {"strategy": strategy}, idempotency_key, filters)

    def bulk_cancel(
        self, *, reason: str = "", idempotency_key: str | None = None, **filters: Unpack[BulkFilters]
    ) -> Plan[m.BulkResult]:
        return self._bulk("cancel", {"reason": reason}, idempotency_key, filters)

    def bulk_archive(self, *, idempotency_key: str | None = None, **filters: Unpack[BulkFilters]) -> Plan[m.BulkResult]:
        return self._bulk("archive", {}, idempotency_key, filters)


def _resume(call: Call[Any], last_id: str) -> Call[Any]:
    params = {k: v for k, v in (call.params or {}).items() if k != "after_seq"}
    return replace(call, params=params, headers={**call.headers, "Last-Event-ID": last_id})


def _data(kind: type[M]) -> Callable[[ServerEvent], M]:
    def decode(event: ServerEvent) -> M:
        return kind.model_validate_json(event.data)

    return decode


# ---------------------------------------------------------------- flows


class FlowsApi(_Spec):
    """Flows and their immutable versions (docs/flows.md). A write answers the flow as projected (FlowWritten), or
    FlowPending when the read model has not caught up yet (the write stands)."""

    def _list_call(self, limit: int, params: dict[str, Any]) -> Call[m.FlowsPage]:
        return Call("GET", "/v1/flows", model(m.FlowsPage), params={**params, "limit": limit})

    def list(
        self,
        *,
        status: str | None = None,
        tag: str | Sequence[str] | None = None,
        trigger_type: str | Sequence[str] | None = None,
        q: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> Plan[m.FlowsPage]:
        params = {"status": status, "tag": tag, "trigger_type": trigger_type, "q": q, "cursor": cursor}
        return self._call(self._list_call(limit, params))

    def iter(
        self,
        *,
        status: str | None = None,
        tag: str | Sequence[str] | None = None,
        trigger_type: str | Sequence[str] | None = None,
        q: str | None = None,
        page_size: int = 100,
    ) -> Items[m.FlowSummary]:
        first = self._list_call(page_size, {"status": status, "tag": tag, "trigger_type": trigger_type, "q": q})
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _cursor(first, p.next_cursor)))

    def get(self, flow_id: str) -> Plan[m.FlowDetail]:
        return self._call(Call("GET", f"/v1/flows/{_seg(flow_id)}", model(m.FlowDetail)))

    def version(self, flow_id: str, version: int) -> Plan[m.FlowVersion]:
        return self._call(Call("GET", f"/v1/flows/{_seg(flow_id)}/versions/{version}", model(m.FlowVersion)))

    def _write(self, path: str, body: Any, key: str | None, ok: int) -> Plan[m.FlowWritten | m.FlowPending]:
        parse = by_status({ok: m.FlowWritten, 202: m.FlowPending})
        return self._call(Call("POST", path, parse, body=body, idempotency_key=key or new_idempotency_key()))

    def create(
        self, definition: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Plan[m.FlowWritten | m.FlowPending]:
        """Version 1 of a new flow (a definition as schemas/jsonschema/FlowDefinition.json, without `tenant_id`
        and `version`)."""
        return self._write("/v1/flows", dict(definition), idempotency_key, 201)

    def publish(
        self, flow_id: str, definition: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Plan[m.FlowWritten | m.FlowPending]:
        """The flow's next version; runs already started keep theirs."""
        return self._write(f"/v1/flows/{_seg(flow_id)}/versions", dict(definition), idempotency_key, 201)

    def pause(
        self, flow_id: str, *, reason: str = "", idempotency_key: str | None = None
    ) -> Plan[m.FlowWritten | m.FlowPending]:
        return self._write(f"/v1/flows/{_seg(flow_id)}/pause", {"reason": reason}, idempotency_key, 200)

    def resume(self, flow_id: str, *, idempotency_key: str | None = None) -> Plan[m.FlowWritten | m.FlowPending]:
        return self._write(f"/v1/flows/{_seg(flow_id)}/resume", None, idempotency_key, 200)

    def wait_projected(self, flow_id: str, *, timeout_s: float = 30.0) -> Plan[m.FlowDetail]:
        """The flow once the API shows it (after a write answered FlowPending)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return (yield from self.get(flow_id))
            except NotFound:
                if time.monotonic() >= deadline:
                    raise
            yield Sleep(0.1)


# ---------------------------------------------------------------- tenants (the operator key), the key's own


class TenantsApi(_Spec):
    """The operator routes `/v1/admin/tenants` (FLOWTRAIL_API_OPERATOR_KEY as the client's key; docs/tenants.md),
    and a tenant's own view with its admin key (`own`)."""

    def create(
        self,
        name: str,
        *,
        id: str | None = None,
        environment: str = "PRODUCTION",
        metadata_days: int | None = None,
        payload_days: int | None = None,
        max_active_runs: int | None = None,
    ) -> Plan[m.NewTenant]:
        """A tenant and its first admin key (`admin_key.key`, shown in this answer only)."""
        body: dict[str, Any] = {"name": name, "environment": environment}
        if id is not None:
            body["id"] = id
        retention = {k: v for k, v in (("metadata_days", metadata_days), ("payload_days", payload_days)) if v}
        if retention:
            body["retention"] = retention
        if max_active_runs is not None:
            body["quotas"] = {"max_active_runs": max_active_runs}
        return self._call(Call("POST", "/v1/admin/tenants", model(m.NewTenant), body=body))

    def list(self, *, limit: int = 100, after: str | None = None) -> Plan[m.Tenants]:
        params = {"limit": limit, "after": after}
        return self._call(Call("GET", "/v1/admin/tenants", model(m.Tenants), params=params))

    def iter(self, *, page_size: int = 1000) -> Items[m.AdminTenant]:
        """Every tenant, by id."""
        first = Call("GET", "/v1/admin/tenants", model(m.Tenants), params={"limit": page_size})
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _cursor(first, p.next_after, "after")))

    def get(self, tenant_id: str) -> Plan[m.AdminTenant]:
        return self._call(Call("GET", f"/v1/admin/tenants/{_seg(tenant_id)}", model(m.AdminTenant)))

    def update(
        self,
        tenant_id: str,
        *,
        name: str | None = None,
        metadata_days: int | None = None,
        payload_days: int | None = None,
        max_active_runs: int | None = None,
        clear_max_active_runs: bool = False,
    ) -> Plan[m.AdminTenant]:
        """Fields left out keep their value (`clear_max_active_runs`: no quota of its own)."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        retention = {
            k: v for k, v in (("metadata_days", metadata_days), ("payload_days", payload_days)) if v is not None
        }
        if retention:
            body["retention"] = retention
        if max_active_runs is not None or clear_max_active_runs:
            body["quotas"] = {"max_active_runs": max_active_runs}
        return self._call(Call("PATCH", f"/v1/admin/tenants/{_seg(tenant_id)}", model(m.AdminTenant), body=body))

    def own(self) -> Plan[m.Tenant]:
        """The calling key's tenant (an admin key)."""
        return self._call(Call("GET", "/v1/tenant", model(m.Tenant)))


# ---------------------------------------------------------------- analytics, alerts, connectors, the session


class AnalyticsApi(_Spec):
    """`GET /v1/analytics/...`: the read models' pass rates, durations, flakiness, failure groups, endpoints."""

    def flow(
        self,
        flow_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        bucket: Literal["hour", "day"] = "day",
    ) -> Plan[m.FlowAnalytics]:
        """Per bucket: runs by status and trigger, pass rate, duration percentiles (default: the last 7 days)."""
        params = {"from": since, "to": until, "bucket": bucket}
        return self._call(Call("GET", f"/v1/analytics/flows/{_seg(flow_id)}", model(m.FlowAnalytics), params=params))

    def flakiness(self, *, flow_id: str | None = None, min_runs: int = 2) -> Plan[m.FlakySteps]:
        params = {"flow_id": flow_id, "min_runs": min_runs}
        return self._call(Call("GET", "/v1/analytics/flakiness", model(m.FlakySteps), params=params))

    def failure_groups(
        self, *, flow_id: str | None = None, category: str | None = None, limit: int = 100
    ) -> Plan[m.FailureGroups]:
        params = {"flow_id": flow_id, "category": category, "limit": limit}
        return self._call(Call("GET", "/v1/analytics/failure-groups", model(m.FailureGroups), params=params))

    def endpoints(self, *, flow_id: str | None = None) -> Plan[m.Endpoints]:
        return self._call(Call("GET", "/v1/analytics/endpoints", model(m.Endpoints), params={"flow_id": flow_id}))


class AlertsApi(_Spec):
    """Fired alerts (an admin key)."""

    def iter(
        self, *, rule_id: str | None = None, flow_id: str | None = None, status: str | None = None, page_size: int = 200
    ) -> Items[m.Alert]:
        """Alert history, newest first, every page."""
        params = {"rule_id": rule_id, "flow_id": flow_id, "status": status, "limit": page_size}
        first = Call("GET", "/v1/alerts", model(m.Alerts), params=params)
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _cursor(first, p.next_cursor)))

    def get(self, alert_id: str) -> Plan[m.AlertDetail]:
        return self._call(Call("GET", f"/v1/alerts/{_seg(alert_id)}", model(m.AlertDetail)))


class ConnectorsApi(_Spec):
    def iter(self, *, status: str | None = None, page_size: int = 100) -> Items[m.Connector]:
        """Every connector by name, with its health and the flows using it."""
        first = Call("GET", "/v1/connectors", model(m.Connectors), params={"status": status, "limit": page_size})
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _cursor(first, p.next_cursor)))

    def get(self, connector_id: str) -> Plan[m.Connector]:
        return self._call(Call("GET", f"/v1/connectors/{_seg(connector_id)}", model(m.Connector)))


class DataApi(_Spec):
    """Canonical records (`/api/public/data/{entity}`, a key with `data:read`): normalised, deduplicated records the
    flows' sync steps wrote, oldest update first."""

    def iter(self, entity: str, *, updated_since: datetime | None = None, fields: Sequence[str] | None = None,
             page_size: int = 500) -> Items[m.CanonicalRecord]:  # fmt: skip
        """Every record of the entity (`fields`: only those, with `canonical_id`)."""
        params = {"updated_since": updated_since, "fields": ",".join(fields) if fields else None, "limit": page_size}
        first = Call("GET", f"/api/public/data/{_seg(entity)}", model(m.CanonicalRecords), params=params)
        return Items(pages(self.ctx, first, lambda p: p.data, lambda p: _cursor(first, p.next_cursor)))

    def get(self, entity: str, canonical_id: str) -> Plan[m.CanonicalRecord]:
        path = f"/api/public/data/{_seg(entity)}/{_seg(canonical_id)}"
        return self._call(Call("GET", path, model(m.CanonicalRecord)))


class SessionApi(_Spec):
    def get(self) -> Plan[m.Session]:
        """Who the key is: its tenant, environment, scopes and rate limits."""
        return self._call(Call("GET", "/v1/session", model(m.Session)))


__all__ = ["BulkFilters", "Origin", "RunFilters"]
