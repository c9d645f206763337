// Flows (docs/console.md): the list, and a flow's detail with its versions, a diff between two of them, its
// schedule and connectors, pause / resume, and the trigger form (sent to ingest, whose address the API's
// /console/config.json gives).

import { useState } from "preact/hooks";
import { consoleConfig, get, post, session } from "./api.js";
import { Json, Problem, go, html, time, useLoad } from "./ui.js";

// A line diff of two texts (longest common subsequence): [kind, line] with kind " ", "+" or "-".
export function diffLines(before, after) {
  const a = before.split("\n");
  const b = after.split("\n");
  const common = Array.from({ length: a.length + 1 }, () => new Int32Array(b.length + 1));
  for (let i = a.length - 1; i >= 0; i--)
    for (let j = b.length - 1; j >= 0; j--)
      common[i][j] = a[i] === b[j] ? common[i + 1][j + 1] + 1 : Math.max(common[i + 1][j], common[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) { out.push([" ", a[i]]); i++; j++; }
    else if (j < b.length && (i >= a.length || common[i][j + 1] >= common[i + 1][j])) out.push(["+", b[j++]]);
    else out.push(["-", a[i++]]);
  }
  return out;
}

function FlowList() {
  const flows = useLoad(() => get("/v1/flows", { limit: 100 }), []);
  const rows = flows.data ? flows.data.data : [];
  return html`<h1>Flows</h1><${Problem} error=${flows.error} />
    <table aria-label="Flows"><thead><tr><th>Flow</th><th>Status</th><th>Version</th><th>Trigger</th><th>Next scheduled run</th>
      <th>Connectors</th><th>Last run</th></tr></thead>
    <tbody>${rows.map((f) => html`<tr><td><a href=${`#/flows/${encodeURIComponent(f.id)}`}>${f.name}</a><br /><span class="muted mono">${f.id}</span></td>
      <td>${f.status}</td><td>v${f.latest_version}</td><td>${f.trigger_type || "–"}</td>
      <td>${f.schedule ? `${f.schedule.cron || `every ${f.schedule.interval_s} s`} · ${time(f.schedule.next_run_at)}` : "–"}</td>
      <td>${f.connectors.join(", ") || "–"}</td><td>${time(f.last_run_at)}</td></tr>`)}</tbody></table>`;
}

function Diff({ id, versions }) {
  const [pair, setPair] = useState([Math.max(1, versions[0] - 1), versions[0]]);
  const loaded = useLoad(() => Promise.all(pair.map((v) => get(`/v1/flows/${encodeURIComponent(id)}/versions/${v}`))), [id, ...pair]);
  const lines = loaded.data ? diffLines(...loaded.data.map((v) => JSON.stringify(v.definition, null, 2))) : [];
  const pick = (at) => (e) => setPair((p) => p.map((v, i) => (i === at ? Number(e.target.value) : v)));
  return html`<section class="card" aria-label="Diff between versions"><div class="row"><h2 class="grow">Diff</h2>
    ${[0, 1].map((at) => html`<label>${at ? "to" : "from"} <select value=${pair[at]} onChange=${pick(at)}>
      ${versions.map((v) => html`<option value=${v}>v${v}</option>`)}</select></label>`)}</div>
    <${Problem} error=${loaded.error} />
    <pre class="diff">${lines.map(([k, line]) => html`<div class=${k === "+" ? "add" : k === "-" ? "del" : ""}>${k} ${line}</div>`)}</pre></section>`;
}

// POST /v1/flows/{id}/trigger on ingest: a JSON input, the mode, an optional start time and Idempotency-Key; the
// run it names opens, live.
function Trigger({ id }) {
  const [mode, setMode] = useState("async");
  const [busy, setBusy] = useState(null);
  const [error, setError] = useState(null);
  async function submit(event) {
    event.preventDefault();
    const form = new FormData(event.target);
    setError(null);
    const body = { mode };
    try {
      body.input = JSON.parse(form.get("input") || "null");
    } catch (e) {
      setError({ message: `Input is not JSON: ${e.message}` });
      return;
    }
    if (mode !== "live" && form.get("run_at")) body.run_at = new Date(form.get("run_at")).toISOString();
    const key = form.get("idempotency_key").trim();
    setBusy(mode === "live" ? "Waiting for the run to end (live mode)…" : "Triggering…");
    try {
      const { ingest_url: ingest } = await consoleConfig();
      // Recorded as a manual run, its caller this key (docs/intake.md#manual-triggers-and-nested-runs).
      const headers = { "X-Flowtrail-Trigger": "manual", ...(key ? { "Idempotency-Key": key } : {}) };
      const answer = await post(`${ingest}/v1/flows/${encodeURIComponent(id)}/trigger`, body, { headers });
      go(`#/runs/${encodeURIComponent(answer.run_id)}`);
    } catch (e) {
      setError(e);
    } finally {
      setBusy(null);
    }
  }
  return html`<section class="card" aria-label="Trigger a run"><h2>Trigger a run</h2>
    <form onSubmit=${submit} aria-label="Trigger">
      <label>Input (JSON)<textarea name="input" rows="5" class="mono" style="width: 100%" defaultValue="{}"></textarea></label>
      <div class="row">
        <label>Mode <select name="mode" value=${mode} onChange=${(e) => setMode(e.target.value)}>
          <option value="async">async: answer at once</option>
          <option value="live">live: wait for the end</option></select></label>
        <label>Run at (optional) <input type="datetime-local" name="run_at" step="1" disabled=${mode === "live"} /></label>
        <label>Idempotency key (optional) <input name="idempotency_key" size="24" /></label>
        <button class="primary" type="submit" disabled=${Boolean(busy)}>Trigger run</button>
      </div>
      ${busy && html`<p class="muted" role="status">${busy}</p>`}
      <${Problem} error=${error} />
    </form></section>`;
}

function FlowDetail({ id }) {
  const flow = useLoad(() => get(`/v1/flows/${encodeURIComponent(id)}`), [id]);
  const [error, setError] = useState(null);
  if (!flow.data) return html`<${Problem} error=${flow.error} />`;
  const f = flow.data;
  async function toggle() {
    try { await post(`/v1/flows/${encodeURIComponent(id)}/${f.status === "paused" ? "resume" : "pause"}`); flow.reload(); } catch (e) { setError(e); }
  }
  return html`<p><a href="#/flows">← Flows</a></p>
    <h1>${f.name} <span class="muted mono">${f.id}</span></h1>
    <section class="card"><div class="row" style="align-items: start"><dl class="kv grow">
      <dt>status</dt><dd>${f.status}</dd><dt>latest version</dt><dd>v${f.latest_version}</dd>
      <dt>description</dt><dd>${f.description || "–"}</dd>
      <dt>schedule</dt><dd>${f.schedule ? `${f.schedule.cron || `every ${f.schedule.interval_s} s`} (${f.schedule.timezone}), next ${time(f.schedule.next_run_at)}` : "none"}</dd>
      <dt>connectors</dt><dd>${f.connectors.map((c) => `${c.name} (${c.used_by.map((u) => u.step).join(", ")})`).join("; ") || "none"}</dd>
      <dt>runs</dt><dd><a href=${`#/runs?flow_id=${encodeURIComponent(f.id)}`}>this flow's runs</a>${" · "}<a href=${`#/analytics?flow_id=${encodeURIComponent(f.id)}`}>analytics</a></dd></dl>
      ${session.can("flows:write") && html`<button onClick=${toggle}>${f.status === "paused" ? "Resume flow" : "Pause flow"}</button>`}
    </div><${Problem} error=${error} /></section>
    ${session.can("runs:write") && html`<${Trigger} id=${f.id} />`}
    <section class="card"><h2>Versions</h2><ul>${f.versions.map((v) => html`<li>v${v.version} · published ${time(v.published_at)}</li>`)}</ul></section>
    ${f.versions.length > 1 && html`<${Diff} id=${f.id} versions=${f.versions.map((v) => v.version).sort((a, b) => b - a)} />`}
    <section class="card"><h2>Definition (v${f.latest_version})</h2><${Json} value=${f.definition} label="definition" /></section>`;
}

export function FlowsPage({ id }) {
  return id ? html`<${FlowDetail} id=${id} />` : html`<${FlowList} />`;
}
