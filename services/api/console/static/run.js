// A run's detail (docs/console.md): the run above, the step timeline left and the selected step right, live while
// it runs (GET /v1/runs/{id}/stream), time travel over its events (?as_of=), record errors, the log by level, and
// the actions its key may take.

import { useEffect, useRef, useState } from "preact/hooks";
import { ApiError, get, post, session, stream } from "./api.js";
import { DIAGNOSED, DiagnosisPanel } from "./diagnosis.js";
import { StepPanel } from "./step.js";
import { FAILED, Icon, Json, Problem, RunLink, Status, TERMINAL, go, html, ms, time, useLoad } from "./ui.js";

const SEGMENTS = [["queued_ms", "queued", "#9aa6b8"], ["wait_ms", "wait", "#c9b27c"], ["read_ms", "read", "#4c7bd9"],
  ["transform_ms", "transform", "#8e6bd1"], ["write_ms", "write", "#2f9e6a"], ["other_ms", "other", "#d0d5dd"]];
const sleep = (t) => new Promise((resolve) => setTimeout(resolve, t));

// A run just accepted (a retry) may take a moment to be projected: 404 is asked again for a few seconds.
async function detail(id, asOf) {
  for (let i = 0; ; i++) {
    try {
      return await get(`/v1/runs/${encodeURIComponent(id)}`, asOf === null ? {} : { as_of: asOf });
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 404 || i >= 40) throw e;
      await sleep(250);
    }
  }
}

async function allEvents(id) {
  const out = [];
  for (let after = -1; ;) {
    const page = await get(`/v1/runs/${encodeURIComponent(id)}/events`, { after_seq: after, limit: 500 });
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.data[page.data.length - 1].seq;
  }
}

function Breakdown({ b }) {
  const total = b.total_ms || SEGMENTS.reduce((sum, [k]) => sum + (b[k] || 0), 0);
  if (!total) return null;
  return html`<div aria-label="Duration breakdown">
    <div class="bar">${SEGMENTS.map(([k, label, color]) => b[k] > 0 && html`<span title=${`${label} ${ms(b[k])}`}
      style=${`width: ${(100 * b[k]) / total}%; background: ${color}`}></span>`)}</div>
    <div class="legend">${SEGMENTS.map(([k, label, color]) => html`<span><i style=${`background: ${color}`}></i>${label} ${ms(b[k])}</span>`)}
      <span><b>total ${ms(total)}</b></span></div></div>`;
}

function Counters({ records }) {
  if (!records || !Object.values(records).some(Boolean)) return null;
  return html`<section class="counters" aria-label="Records">${Object.entries(records).map(([k, v]) =>
    html`<div><span class="muted">${k}</span><b>${v}</b></div>`)}</section>`;
}

function ResumeForm({ run, onDone }) {
  const wait = run.waiting_for;
  const [error, setError] = useState(null);
  const fields = (wait.prompt && wait.prompt.fields) || [];
  async function submit(event) {
    event.preventDefault();
    const form = new FormData(event.target);
    const answer = {};
    for (const name of fields) {
      const text = String(form.get(name) ?? "");
      try { answer[name] = JSON.parse(text); } catch { answer[name] = text; } // true, 3, "DHL"
    }
    try {
      await post(`/v1/runs/${run.id}/resume/${wait.request_id}`, answer);
      onDone("Answer sent: the run resumes.");
    } catch (e) { setError(e); }
  }
  return html`<form class="card" onSubmit=${submit} aria-label="Resume">
    <h2>Waiting for a person</h2>
    <p>${(wait.prompt && wait.prompt.question) || "This run waits for an answer."}
      <span class="muted"> (step ${wait.step}, request ${wait.request_id}${wait.expires_at ? `, until ${time(wait.expires_at)}` : ""})</span></p>
    <div class="row">${fields.map((name) => html`<label>${name}<input name=${name} /></label>`)}
      <button class="primary" type="submit">Resume</button></div>
    <p class="muted">Each value is read as JSON when it parses (true, 42, "text"), as text otherwise.</p>
    <${Problem} error=${error} />
  </form>`;
}

function Actions({ run, onMessage }) {
  const [error, setError] = useState(null);
  if (!session.can("runs:write")) return null;
  async function act(path, body, then) {
    setError(null);
    try { then(await post(`/v1/runs/${run.id}/${path}`, body)); } catch (e) { setError(e); }
  }
  const retry = (strategy) => act("retry", { strategy }, (r) => go(`#/runs/${r.run_id}`));
  const done = TERMINAL.has(run.status);
  return html`<div class="actions" aria-label="Actions">
    ${FAILED.has(run.status) && html`<button class="primary" onClick=${() => retry("FROM_FAILED_STEP")}>Retry from the failed step</button>`}
    ${done && html`<button onClick=${() => retry("ON_LATEST_VERSION")}>Re-run on the latest version</button>`}
    ${!done && html`<button class="danger" onClick=${() => act("cancel", { reason: "canceled from the console" }, () => onMessage("Cancel requested."))}>Cancel</button>`}
    ${done && !run.archived && html`<button onClick=${() => act("archive", {}, () => onMessage("Archived: hidden from the default list."))}>Archive</button>`}
    <${Problem} error=${error} />
  </div>`;
}

function Scrubber({ events, asOf, onChange }) {
  const points = events.filter((e) => e.type !== "LogEmitted");
  if (points.length < 2) return null;
  const index = asOf === null ? points.length - 1 : Math.max(0, points.findIndex((e) => e.seq === asOf));
  const at = points[index];
  return html`<section class="card" aria-label="Time travel">
    <div class="scrubber">
      <label class="inline" for="scrub">Time travel</label>
      <input id="scrub" type="range" min="0" max=${points.length - 1} value=${index}
        aria-valuetext=${`after event ${at.seq}: ${at.type}`}
        onInput=${(e) => { const p = points[Number(e.target.value)]; onChange(p.seq === points[points.length - 1].seq ? null : p.seq); }} />
      <span class="mono">#${at.seq} ${at.type}</span>
      <button disabled=${asOf === null} onClick=${() => onChange(null)}>Now</button>
    </div></section>`;
}

function Logs({ id, version }) {
  const [level, setLevel] = useState("INFO");
  const logs = useLoad(() => get(`/v1/runs/${encodeURIComponent(id)}/logs`, { level }), [id, level, version]);
  return html`<section class="card" aria-label="Log">
    <div class="row"><h2 class="grow">Log</h2>
      <label>Level <select value=${level} onChange=${(e) => setLevel(e.target.value)}>
        ${["DEBUG", "INFO", "WARNING", "ERROR"].map((l) => html`<option value=${l}>${l}</option>`)}</select></label></div>
    <${Problem} error=${logs.error} />
    <table aria-label="Log lines"><tbody>${(logs.data ? logs.data.data : []).map((l) => html`<tr>
      <td class="mono">${time(l.occurred_at)}</td><td><span class=${`status ${l.level === "ERROR" ? "FAILED" : l.level === "WARNING" ? "PARTIAL" : ""}`}>${l.level}</span></td>
      <td>${l.step || ""}</td><td>${l.message}</td></tr>`)}</tbody></table></section>`;
}

function RecordErrors({ id, version }) {
  const errors = useLoad(() => get(`/v1/runs/${encodeURIComponent(id)}/record-errors`), [id, version]);
  const rows = errors.data ? errors.data.data : [];
  if (!rows.length) return null;
  return html`<section class="card" aria-label="Record errors"><h2>Record errors</h2>
    <table aria-label="Refused records"><thead><tr><th>Step</th><th>Record</th><th>Field path</th><th>Error</th><th>Destination's answer</th></tr></thead>
    <tbody>${rows.map((e) => html`<tr><td>${e.step}</td><td class="mono">${e.record_key}</td>
      <td class="mono" data-testid="field-path">${e.field_path || "–"}</td><td>${e.error}</td>
      <td><details><summary>raw</summary><${Json} value=${e.raw_error} label="raw error" /></details></td></tr>`)}</tbody></table></section>`;
}

function Lineage({ run }) {
  const links = [["retry of", run.retry_of && html`<${RunLink} id=${run.retry_of} /> ${run.retry_strategy ? html`<span class="muted">${run.retry_strategy}</span>` : ""}`],
    ["parent", run.parent_run_id && html`<${RunLink} id=${run.parent_run_id} />`],
    ["retries", run.retries && run.retries.length > 0 && run.retries.map((r) => html`<span><${RunLink} id=${r.id} /> <${Status} status=${r.status} /> </span>`)]];
  const children = (run.steps || []).filter((s) => s.output && s.output.child_run_id);
  if (children.length) links.push(["children", children.map((s) => html`<span><${RunLink} id=${s.output.child_run_id} /> </span>`)]);
  const shown = links.filter(([, v]) => v);
  return shown.length ? html`<dl class="kv">${shown.map(([k, v]) => html`<dt>${k}</dt><dd>${v}</dd>`)}</dl>` : null;
}

export function RunPage({ id }) {
  const [asOf, setAsOf] = useState(null);
  const [version, setVersion] = useState(0); // bumped as live events arrive: reloads the log and record errors
  const [message, setMessage] = useState(null);
  const [chosen, setChosen] = useState(null);
  const run = useLoad(() => detail(id, asOf), [id, asOf, version]);
  const events = useLoad(() => allEvents(id), [id, version]);
  const final = run.data && asOf === null && TERMINAL.has(run.data.status);
  const pending = useRef(null);
  // The moment the run is first on screen, for the bench (tests/bench/test_console_bench.py).
  useEffect(() => {
    if (run.data && !performance.getEntriesByName("run-rendered").length) performance.mark("run-rendered");
  }, [run.data]);

  useEffect(() => {
    if (!run.data || final || asOf !== null) return undefined;
    const stop = new AbortController();
    const bump = () => { // many events in a burst: one reload
      if (pending.current) return;
      pending.current = setTimeout(() => { pending.current = null; setVersion((v) => v + 1); }, 150);
    };
    stream(`/v1/runs/${encodeURIComponent(id)}/stream`, bump, stop.signal, { untilEnd: true }).then(() => {
      if (!stop.signal.aborted) setVersion((v) => v + 1);
    });
    return () => { stop.abort(); clearTimeout(pending.current); pending.current = null; };
  }, [id, Boolean(run.data), final, asOf]);

  if (!run.data) return html`<${Problem} error=${run.error} />${!run.error && html`<p class="muted">Loading ${id}…</p>`}`;
  const r = run.data;
  const steps = r.steps || [];
  const failed = steps.find((s) => s.status === "FAILED");
  const selected = steps.find((s) => s.name === chosen) || failed || steps[steps.length - 1];
  return html`
    <p><a href="#/runs">← Runs</a></p>
    <h1><span class="mono">${r.id}</span> <${Status} status=${r.status} /></h1>
    ${asOf !== null && html`<p class="asof" role="status">Time travel: the run as it was after event #${r.as_of ? r.as_of.seq : asOf}${r.as_of ? ` (${time(r.as_of.occurred_at)})` : ""}. <button onClick=${() => setAsOf(null)}>Back to now</button></p>`}
    ${message && html`<p class="notice" role="status">${message}</p>`}
    <${Problem} error=${run.error} />
    <section class="card" aria-label="Run">
      <div class="row" style="align-items: start">
        <dl class="kv grow">
          <dt>flow</dt><dd><a href=${`#/flows/${encodeURIComponent(r.flow_id)}`}>${r.flow_name || r.flow_id}</a> v${r.flow_version}</dd>
          <dt>triggered by</dt><dd>${r.trigger ? r.trigger.type : r.trigger_type}${r.trigger && r.trigger.caller ? ` · ${r.trigger.caller}` : ""} · ${r.execution_mode}</dd>
          <dt>created</dt><dd>${time(r.created_at)}</dd>
          <dt>started / finished</dt><dd>${time(r.started_at)} / ${time(r.finished_at)}</dd>
          <dt>duration</dt><dd>${ms(r.duration_ms)}</dd>
          ${r.tags && r.tags.length > 0 && html`<dt>tags</dt><dd>${r.tags.join(", ")}</dd>`}
          ${r.cursor_window && html`<dt>cursor window</dt><dd class="mono">${r.cursor_window.updated_since || "the beginning"} → ${r.cursor_window.updated_until || "now"}</dd>`}
          ${r.error_message && html`<dt>error</dt><dd class="err" style="white-space: normal">${r.failed_step ? html`<b>${r.failed_step}</b>: ` : ""}${r.error_message}${r.error_category ? ` (${r.error_category})` : ""}</dd>`}
        </dl>
        ${asOf === null && html`<${Actions} run=${r} onMessage=${(m) => { setMessage(m); setVersion((v) => v + 1); }} />`}
      </div>
      <${Lineage} run=${r} />
      <${Counters} records=${r.records} />
      <${Breakdown} b=${r.duration_breakdown || {}} />
      <details><summary>Trigger payload</summary><${Json} value=${r.trigger && r.trigger.payload} label="payload" /></details>
    </section>
    ${asOf === null && DIAGNOSED.has(r.status) && html`<${DiagnosisPanel} id=${r.id} version=${version} />`}
    ${r.status === "PAUSED" && r.waiting_for && asOf === null && session.can("runs:write") &&
      html`<${ResumeForm} run=${r} onDone=${(m) => { setMessage(m); setVersion((v) => v + 1); }} />`}
    <${Scrubber} events=${events.data || []} asOf=${asOf} onChange=${setAsOf} />
    <div class="detail">
      <section class="card" aria-label="Timeline"><h2>Steps</h2>
        <ol class="timeline">${steps.map((s) => html`<li key=${s.name}>
          <button aria-pressed=${selected && selected.name === s.name ? "true" : "false"} onClick=${() => setChosen(s.name)}>
            <${Icon} status=${s.status} /><span>${s.name} <span class="muted">${s.action || ""}</span>${s.attempts && s.attempts.length > 1 ? html` <span class="muted">×${s.attempts.length}</span>` : ""}</span>
            <span class="muted">${ms(s.duration_ms)}</span></button></li>`)}</ol>
        ${!steps.length && html`<p class="muted">No step has started.</p>`}
      </section>
      <${StepPanel} step=${selected} />
    </div>
    ${asOf === null && html`<${RecordErrors} id=${r.id} version=${version} /><${Logs} id=${r.id} version=${version} />`}`;
}
