// Analytics (docs/console.md): a flow's pass rate, duration p50/p95 and runs by status over time as uPlot charts,
// runs by trigger, flaky steps, failure groups with their next action, and the endpoints flows called.

import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import { get } from "./api.js";
import { Problem, RunLink, go, html, time, useLoad } from "./ui.js";

const WINDOWS = [["24h", "last 24 hours", 86400, "hour"], ["7d", "last 7 days", 604800, "day"], ["30d", "last 30 days", 2592000, "day"]];
const COLORS = ["#2857c5", "#b42318", "#1c7c3c", "#a15c00", "#8e6bd1", "#6b7280", "#0e7490"];

// Bars for counts, lines with points for rates and durations (a single bucket still shows).
function Chart({ title, x, series, bars = false }) {
  const box = useRef(null);
  useEffect(() => {
    const options = {
      title, width: Math.max(360, box.current.clientWidth - 8), height: 220,
      series: [{}, ...series.map(([label], i) => ({
        label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: !bars, size: 8 },
        ...(bars ? { fill: COLORS[i % COLORS.length], paths: uPlot.paths.bars({ size: [0.6 / series.length, 48], align: 0 }) } : {}),
      }))],
      scales: { x: { time: true } },
    };
    const plot = new uPlot(options, [x, ...series.map(([, values]) => values)], box.current);
    return () => plot.destroy();
  }, [title, JSON.stringify(x), JSON.stringify(series)]);
  return html`<figure class="card" aria-label=${title} style="margin: 0"><div ref=${box}></div></figure>`;
}

function FlowCharts({ flowId, window }) {
  const [, , seconds, bucket] = WINDOWS.find(([w]) => w === window);
  const stats = useLoad(() => get(`/v1/analytics/flows/${encodeURIComponent(flowId)}`,
    { bucket, from: new Date(Date.now() - seconds * 1000).toISOString() }), [flowId, window]);
  if (!stats.data) return html`<${Problem} error=${stats.error} />`;
  const s = stats.data;
  const x = s.series.map((b) => new Date(b.bucket).getTime() / 1000);
  const statuses = [...new Set(s.series.flatMap((b) => Object.keys(b.by_status)))].sort();
  const triggers = {};
  for (const b of s.series) for (const [t, n] of Object.entries(b.by_trigger)) triggers[t] = (triggers[t] || 0) + n;
  return html`<p data-testid="analytics-summary"><b>${s.runs}</b> run(s), pass rate${" "}<b>${s.pass_rate === null || s.pass_rate === undefined ? "–" : `${Math.round(s.pass_rate * 100)} %`}</b>${" "}(${time(s.from)} → ${time(s.to)}, per ${s.bucket})</p>
    <div class="charts">
      <${Chart} title="Pass rate (%)" x=${x} series=${[["pass rate", s.series.map((b) => (b.pass_rate === null ? null : b.pass_rate * 100))]]} />
      <${Chart} title="Duration (ms)" x=${x} series=${[["p50", s.series.map((b) => b.duration_ms.p50)], ["p95", s.series.map((b) => b.duration_ms.p95)]]} />
      <${Chart} title="Runs by status" bars=${true} x=${x} series=${statuses.map((st) => [st, s.series.map((b) => b.by_status[st] || 0)])} />
    </div>
    <h2>Runs by trigger</h2>
    <table aria-label="Runs by trigger"><tbody>${Object.entries(triggers).map(([t, n]) => html`<tr><td>${t}</td><td>${n}</td></tr>`)}</tbody></table>`;
}

function Tables() {
  const flaky = useLoad(() => get("/v1/analytics/flakiness"), []);
  const groups = useLoad(() => get("/v1/analytics/failure-groups"), []);
  const endpoints = useLoad(() => get("/v1/analytics/endpoints"), []);
  const rows = (load) => (load.data ? load.data.data : []);
  return html`<h2>Failure groups</h2><${Problem} error=${groups.error} />
    <table aria-label="Failure groups"><thead><tr><th>Flow</th><th>Step</th><th>Category</th><th>Message</th><th>Runs</th><th>Last seen</th><th>Next action</th></tr></thead>
    <tbody>${rows(groups).map((g) => html`<tr><td>${g.flow_id}</td><td>${g.step || "–"}</td><td>${g.category}</td><td class="mono">${g.message_pattern}</td>
      <td>${g.runs}</td><td>${time(g.last_seen)} <${RunLink} id=${g.last_run_id} /></td><td>${g.next_action}</td></tr>`)}</tbody></table>
    <h2>Flaky steps</h2><${Problem} error=${flaky.error} />
    <table aria-label="Flaky steps"><thead><tr><th>Flow</th><th>Version</th><th>Step</th><th>Passed</th><th>Failed</th><th>Retried</th><th>Score</th></tr></thead>
    <tbody>${rows(flaky).map((f) => html`<tr><td>${f.flow_id}</td><td>v${f.flow_version}</td><td>${f.step}</td><td>${f.succeeded}</td><td>${f.failed}</td><td>${f.retried}</td><td>${f.score.toFixed(2)}</td></tr>`)}</tbody></table>
    ${!rows(flaky).length && html`<p class="muted">No step both passed and failed on one version.</p>`}
    <h2>Endpoint coverage</h2><${Problem} error=${endpoints.error} />
    <table aria-label="Endpoints"><thead><tr><th>Flow</th><th>Method</th><th>Host</th><th>Route</th><th>Calls</th><th>Last seen</th></tr></thead>
    <tbody>${rows(endpoints).map((e) => html`<tr><td>${e.flow_id}</td><td>${e.method}</td><td>${e.host}</td><td class="mono">${e.route}</td><td>${e.calls}</td><td>${time(e.last_seen)}</td></tr>`)}</tbody></table>`;
}

export function AnalyticsPage({ params }) {
  const flows = useLoad(() => get("/v1/flows", { limit: 100 }).then((r) => r.data), []);
  // By default the flow that ran last.
  const latest = (flows.data || []).slice().sort((a, b) => String(b.last_run_at || "").localeCompare(String(a.last_run_at || "")))[0];
  const flowId = params.get("flow_id") || (latest && latest.id);
  const window = params.get("window") || "24h";
  const choose = (name) => (e) => { const p = new URLSearchParams(params); p.set(name, e.target.value); if (!p.get("flow_id")) p.set("flow_id", flowId); go(`#/analytics?${p}`); };
  return html`<h1>Analytics</h1>
    <div class="card row">
      <label>Flow <select value=${flowId} onChange=${choose("flow_id")}>
        ${(flows.data || []).map((f) => html`<option value=${f.id}>${f.name}</option>`)}</select></label>
      <label>Window <select value=${window} onChange=${choose("window")}>
        ${WINDOWS.map(([w, label]) => html`<option value=${w}>${label}</option>`)}</select></label>
    </div>
    <${Problem} error=${flows.error} />
    ${flowId && html`<${FlowCharts} key=${`${flowId}:${window}`} flowId=${flowId} window=${window} />`}
    <${Tables} />`;
}
