// The runs list (docs/console.md): filters in the location hash, cursor paging, rows kept live by the tenant's
// status stream (GET /v1/stream), bulk retry / cancel / archive of the selected runs or of every run matching the
// filters, with the dry run's count shown before confirming.

import { useEffect, useRef, useState } from "preact/hooks";
import { get, post, qs, session, stream } from "./api.js";
import { Confirm, Problem, RunLink, STATUSES, Status, TRIGGER_TYPES, go, html, ms, time, useLoad } from "./ui.js";

const PAGE = 50;
const RANGES = [["1h", "last hour", 3600], ["24h", "last 24 hours", 86400], ["7d", "last 7 days", 604800],
  ["30d", "last 30 days", 2592000], ["all", "any time", null]];
const SORTS = [["-created_at", "newest first"], ["created_at", "oldest first"], ["-updated_at", "recently changed"],
  ["-duration", "longest"], ["duration", "shortest"], ["status", "status"]];
const PAST = { retry: "retried", cancel: "canceled", archive: "archived" };
const FILTERS = ["flow_id", "status", "trigger_type", "caller", "tags", "q", "range", "sort", "include_archived"];

// The API query for the hash's filters (the time range becomes `from`, default the last 24 hours).
function query(params) {
  const out = { limit: PAGE };
  for (const name of ["flow_id", "status", "trigger_type", "caller", "tags"]) {
    const values = params.getAll(name).filter(Boolean);
    if (values.length) out[name] = values;
  }
  for (const name of ["q", "sort", "cursor", "include_archived"]) if (params.get(name)) out[name] = params.get(name);
  const range = RANGES.find(([id]) => id === (params.get("range") || "24h"));
  if (range && range[2]) out.from = new Date(Date.now() - range[2] * 1000).toISOString();
  return out;
}

// Whether a run that changed belongs on this (first) page: the filters a client can check itself.
function fits(run, q) {
  if (q.flow_id && !q.flow_id.includes(run.flow_id)) return false;
  if (q.trigger_type && !q.trigger_type.includes(run.trigger_type)) return false;
  if (q.caller && !q.caller.includes(run.caller)) return false;
  if (q.tags && !q.tags.every((t) => run.tags.includes(t))) return false;
  return !q.q && !q.cursor && (q.sort || "-created_at") === "-created_at" && !run.archived;
}

function Filters({ params, flows }) {
  function submit(event) {
    event.preventDefault();
    const form = new FormData(event.target);
    const next = new URLSearchParams();
    for (const name of FILTERS) for (const v of form.getAll(name)) if (v) next.append(name, v);
    go(`#/runs?${next}`);
  }
  const chosen = new Set(params.getAll("status"));
  return html`<form class="card row" onSubmit=${submit} aria-label="Filter runs">
    <label class="grow">Search: run id or error text
      <input type="search" name="q" value=${params.get("q") || ""} placeholder="e.g. Customer Email" /></label>
    <label>Flow
      <select name="flow_id" aria-label="Flow"><option value="">all flows</option>
        ${(flows || []).map((f) => html`<option value=${f.id} selected=${params.get("flow_id") === f.id}>${f.name}</option>`)}
      </select></label>
    <label>Status
      <select name="status" aria-label="Status"><option value="">any status</option>
        ${STATUSES.map(([s, word]) => html`<option value=${s} selected=${chosen.has(s)}>${word ? `${s} (${word})` : s}</option>`)}
      </select></label>
    <label>Trigger
      <select name="trigger_type" aria-label="Trigger"><option value="">any trigger</option>
        ${TRIGGER_TYPES.map((t) => html`<option value=${t} selected=${params.get("trigger_type") === t}>${t}</option>`)}
      </select></label>
    <label>Caller <input name="caller" size="12" value=${params.get("caller") || ""} /></label>
    <label>Tag <input name="tags" size="10" value=${params.get("tags") || ""} /></label>
    <label>Time
      <select name="range" aria-label="Time">${RANGES.map(([id, label]) =>
        html`<option value=${id} selected=${(params.get("range") || "24h") === id}>${label}</option>`)}</select></label>
    <label>Sort
      <select name="sort" aria-label="Sort">${SORTS.map(([id, label]) =>
        html`<option value=${id} selected=${(params.get("sort") || "-created_at") === id}>${label}</option>`)}</select></label>
    <label class="inline"><input type="checkbox" name="include_archived" value="true"
      checked=${params.get("include_archived") === "true"} /> archived too</label>
    <button class="primary" type="submit">Apply</button>
    <button type="button" onClick=${() => go("#/runs")}>Reset</button>
  </form>`;
}

// The bulk filter (POST /v1/runs/bulk/*) for the list's filters: {body} or, when the list uses a filter the bulk
// actions do not take, {why}. Runs created after the dry run are left out (`created_before`), so the confirmed
// action reaches the runs the dry run counted, not newer ones.
function byFilter(q) {
  const missing = ["trigger_type", "tags", "q"].filter((name) => q[name]);
  if (q.caller && q.caller.length > 1) missing.push("several callers");
  if (missing.length) return { why: `Bulk actions by filter cannot use ${missing.join(", ")}: select the runs instead.` };
  if (!q.flow_id && !q.status && !q.caller && !q.from) {
    return { why: "Bulk actions by filter need a filter (a flow, a status, a caller or a time range)." };
  }
  const body = { include_archived: q.include_archived === "true", created_before: new Date().toISOString() };
  if (q.flow_id) body.flow_id = q.flow_id;
  if (q.status) body.statuses = q.status;
  if (q.caller) body.caller = q.caller[0];
  if (q.from) body.created_after = q.from;
  return { body };
}

const title = (word) => word[0].toUpperCase() + word.slice(1);

function Bulk({ selected, q, onDone }) {
  const [pending, setPending] = useState(null); // {action, body, what, preview}
  const [error, setError] = useState(null);
  const ids = [...selected];
  const filter = byFilter(q);
  async function preview(action, body, what) {
    setError(null);
    try {
      setPending({ action, body, what, preview: await post(`/v1/runs/bulk/${action}`, { ...body, dry_run: true }) });
    } catch (e) { setError(e); }
  }
  async function answer(yes) {
    const { action, body } = pending;
    setPending(null);
    if (!yes) return;
    try {
      const done = await post(`/v1/runs/bulk/${action}`, body);
      onDone(`${action}: ${done.count} run(s), operation ${done.bulk_operation_id}`);
    } catch (e) { setError(e); }
  }
  if (!session.can("runs:write")) return null;
  const skipped = pending ? Object.entries(pending.preview.skipped || {}) : [];
  return html`<div class="row" style="margin: .5rem 0">
    <span>${ids.length} selected</span>
    ${["retry", "cancel", "archive"].map((a) => html`<button disabled=${!ids.length}
      onClick=${() => preview(a, { ids }, "selected run(s)")}>${title(a)} selected…</button>`)}
    <span class="muted">or every run matching the filters:</span>
    ${["retry", "cancel", "archive"].map((a) => html`<button disabled=${!filter.body} title=${filter.why || ""}
      onClick=${() => preview(a, byFilter(q).body, "run(s) matching the filters")}>${title(a)} all matching…</button>`)}
    <${Problem} error=${error} />
    <${Confirm} open=${Boolean(pending)} title=${pending ? `Bulk ${pending.action}` : ""}
      confirmLabel=${pending ? `${title(pending.action)} ${pending.preview.count} run(s)` : ""}
      onClose=${answer}>
      ${pending && html`<p data-testid="dry-run">Dry run: <b>${pending.preview.count}</b> of ${pending.preview.matched}${" "}${pending.what} would be ${PAST[pending.action]}.</p>
        ${skipped.length > 0 && html`<p class="muted">Left alone: ${skipped.map(([why, n]) => `${n} ${why}`).join(", ")}</p>`}`}
    </${Confirm}>
  </div>`;
}

export function RunsPage({ params }) {
  const key = params.toString();
  const q = query(params);
  const flows = useLoad(() => get("/v1/flows", { limit: 100 }).then((r) => r.data), []);
  const runs = useLoad(() => get("/v1/runs", query(params)), [key]);
  const [selected, setSelected] = useState(new Set());
  const [done, setDone] = useState(null);
  const live = useRef(new Map()); // run id → the newest summary the stream gave
  useEffect(() => setSelected(new Set()), [key]);

  useEffect(() => {
    const stop = new AbortController();
    const filter = { flow_id: q.flow_id, status: q.status };
    live.current = new Map();
    stream(`/v1/stream${qs(filter)}`, ({ data: run }) => {
      live.current.set(run.id, run);
      runs.setData((page) => {
        if (!page) return page;
        const at = page.data.findIndex((r) => r.id === run.id);
        if (at >= 0 && run.archived && !q.include_archived) return { ...page, data: page.data.filter((r) => r.id !== run.id) };
        if (at >= 0) return { ...page, data: page.data.map((r) => (r.id === run.id ? { ...r, ...run } : r)) };
        return fits(run, q) ? { ...page, data: [run, ...page.data].slice(0, PAGE) } : page;
      });
    }, stop.signal);
    return () => stop.abort();
  }, [key]);

  const page = runs.data;
  // A list (re)loaded while a change was on its way may answer a run as it was before a change the stream has
  // delivered already (a bulk action's reload): the newer of the two wins.
  const rows = (page ? page.data : [])
    .map((r) => {
      const seen = live.current.get(r.id);
      return seen && Date.parse(seen.updated_at) > Date.parse(r.updated_at) ? { ...r, ...seen } : r;
    })
    .filter((r) => q.include_archived || !r.archived);
  // The moment the first page of runs is on screen, for the bench (tests/bench/test_console_bench.py).
  useEffect(() => {
    if (page && !performance.getEntriesByName("runs-rendered").length) performance.mark("runs-rendered");
  }, [page]);
  const toggle = (id) => setSelected((s) => { const n = new Set(s); n.has(id) ? n.delete(id) : n.add(id); return n; });
  const all = rows.length > 0 && rows.every((r) => selected.has(r.id));
  const pageTo = (cursor) => { const p = new URLSearchParams(params); p.set("cursor", cursor); go(`#/runs?${p}`); };
  return html`<h1>Runs</h1>
    <${Filters} params=${params} flows=${flows.data} />
    <${Problem} error=${runs.error} />
    ${done && html`<p class="notice" role="status">${done}</p>`}
    <${Bulk} selected=${selected} q=${q} onDone=${(message) => { setDone(message); setSelected(new Set()); runs.reload(); }} />
    <table aria-label="Runs" aria-busy=${runs.loading ? "true" : "false"}>
      <thead><tr>
        <th><input type="checkbox" aria-label="Select every run on this page" checked=${all}
          onChange=${() => setSelected(all ? new Set() : new Set(rows.map((r) => r.id)))} /></th>
        <th>Run</th><th>Flow</th><th>Status</th><th>Triggered by</th><th>Started</th><th>Duration</th><th>Failed step / error</th>
      </tr></thead>
      <tbody>
        ${rows.map((r) => html`<tr key=${r.id} data-run=${r.id}>
          <td><input type="checkbox" aria-label=${`Select ${r.id}`} checked=${selected.has(r.id)} onChange=${() => toggle(r.id)} /></td>
          <td><${RunLink} id=${r.id} />${r.archived ? html` <span class="muted">(archived)</span>` : ""}</td>
          <td class="flow">${r.flow_name || r.flow_id}${r.flow_version ? html` <span class="muted">v${r.flow_version}</span>` : ""}</td>
          <td><${Status} status=${r.status} /></td>
          <td>${r.trigger_type}${r.caller ? html`<br /><span class="muted">${r.caller}</span>` : ""}</td>
          <td>${time(r.started_at || r.created_at)}</td>
          <td>${ms(r.duration_ms)}</td>
          <td class="err" title=${r.error_message || ""}>${r.failed_step ? html`<b>${r.failed_step}</b>: ` : ""}${r.error_message || ""}</td>
        </tr>`)}
      </tbody>
    </table>
    ${page && !rows.length && html`<p class="muted pad">No runs match these filters.</p>`}
    <div class="pager">
      <button disabled=${!page || !page.prev_cursor} onClick=${() => pageTo(page.prev_cursor)}>← Newer</button>
      <button disabled=${!page || !page.next_cursor} onClick=${() => pageTo(page.next_cursor)}>Older →</button>
      <span class="muted">${rows.length} run(s) on this page</span>
    </div>`;
}
