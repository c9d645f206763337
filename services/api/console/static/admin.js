// Connectors (status, degraded since, last error, Verify), webhooks (subscriptions, delivery log, redeliver) and
// alerts (rules and history): docs/console.md.

import { useState } from "preact/hooks";
import { get, post, session } from "./api.js";
import { Json, Problem, RunLink, html, time, useLoad } from "./ui.js";

function Verify({ id }) {
  const [result, setResult] = useState(null);
  const [error, setError] = useState(null);
  async function verify() {
    setError(null);
    try { setResult(await post(`/v1/connectors/${encodeURIComponent(id)}/verify`)); } catch (e) { setError(e); }
  }
  return html`<button onClick=${verify}>Verify</button>
    ${result && html` <span class=${`status ${result.ok ? "passed" : "failed"}`}>${result.ok ? "ok" : "failed"}</span>
      <span class="muted"> ${Math.round(result.latency_ms)} ms</span>${result.error && html`<${Json} value=${result.error} label="verify error" />`}`}
    <${Problem} error=${error} />`;
}

export function ConnectorsPage() {
  const connectors = useLoad(() => get("/v1/connectors", { limit: 100 }), []);
  const rows = connectors.data ? connectors.data.data : [];
  return html`<h1>Connectors</h1><${Problem} error=${connectors.error} />
    <table aria-label="Connectors"><thead><tr><th>Name</th><th>Kind</th><th>Status</th><th>Degraded since</th><th>Last error</th>
      <th>Used by</th><th>Last verified</th><th></th></tr></thead>
    <tbody>${rows.map((c) => html`<tr><td>${c.name}</td><td>${c.kind}</td><td>${c.status}</td><td>${time(c.health.degraded_since)}</td>
      <td>${c.health.last_error ? html`<${Json} value=${c.health.last_error} label="last error" />` : "–"}
        ${c.health.last_failure && c.health.last_failure.run_id && html`<br /><${RunLink} id=${c.health.last_failure.run_id} />`}</td>
      <td>${c.flows.map((f) => f.name).join(", ") || "–"}</td><td>${time(c.last_verified_at)}</td>
      <td>${session.can("flows:write") && html`<${Verify} id=${c.id} />`}</td></tr>`)}</tbody></table>
    ${connectors.data && !rows.length && html`<p class="muted">No connectors registered (POST /v1/connectors).</p>`}`;
}

function Deliveries({ id }) {
  const deliveries = useLoad(() => get(`/v1/webhooks/${encodeURIComponent(id)}/deliveries`), [id]);
  const [error, setError] = useState(null);
  async function redeliver(deliveryId) {
    try { await post(`/v1/webhooks/deliveries/${encodeURIComponent(deliveryId)}/redeliver`); deliveries.reload(); } catch (e) { setError(e); }
  }
  const rows = deliveries.data ? deliveries.data.data : [];
  return html`<${Problem} error=${deliveries.error || error} />
    <table aria-label="Deliveries"><thead><tr><th>Event</th><th>Status</th><th>Attempts</th><th>Last answer</th><th>Created</th><th>Delivered</th><th></th></tr></thead>
    <tbody>${rows.map((d) => html`<tr><td>${d.event}</td><td>${d.status}</td><td>${d.attempts}</td>
      <td>${d.last_status_code || ""} ${d.last_error || ""}</td><td>${time(d.created_at)}</td><td>${time(d.delivered_at)}</td>
      <td><button onClick=${() => redeliver(d.id)}>Redeliver</button></td></tr>`)}</tbody></table>
    ${deliveries.data && !rows.length && html`<p class="muted">No deliveries yet.</p>`}`;
}

export function WebhooksPage() {
  const hooks = useLoad(() => get("/v1/webhooks"), []);
  const [open, setOpen] = useState(null);
  const rows = hooks.data ? hooks.data.data : [];
  return html`<h1>Webhooks</h1><${Problem} error=${hooks.error} />
    <table aria-label="Webhook subscriptions"><thead><tr><th>URL</th><th>Events</th><th>Active</th><th>Created</th><th></th></tr></thead>
    <tbody>${rows.map((w) => html`<tr><td class="mono">${w.url}</td><td>${w.events.join(", ")}</td><td>${w.active ? "yes" : "no"}</td>
      <td>${time(w.created_at)}</td><td><button aria-expanded=${open === w.id} onClick=${() => setOpen(open === w.id ? null : w.id)}>Delivery log</button></td></tr>`)}</tbody></table>
    ${hooks.data && !rows.length && html`<p class="muted">No webhook subscriptions (POST /v1/webhooks).</p>`}
    ${open && html`<h2>Deliveries</h2><${Deliveries} id=${open} />`}`;
}

export function AlertsPage() {
  const rules = useLoad(() => get("/v1/alert-rules"), []);
  const alerts = useLoad(() => get("/v1/alerts"), []);
  const rows = (load) => (load.data ? load.data.data : []);
  return html`<h1>Alerts</h1>
    <h2>Rules</h2><${Problem} error=${rules.error} />
    <table aria-label="Alert rules"><thead><tr><th>Name</th><th>Flow</th><th>Kind</th><th>Enabled</th><th>Open</th><th>Channels</th></tr></thead>
    <tbody>${rows(rules).map((r) => html`<tr><td>${r.name}</td><td>${r.flow_id}</td><td>${r.kind}</td><td>${r.enabled ? "yes" : "no"}</td>
      <td>${r.state.open ? "open" : "–"}</td><td>${r.channels.map((c) => c.type || c.kind || "channel").join(", ")}</td></tr>`)}</tbody></table>
    ${rules.data && !rows(rules).length && html`<p class="muted">No alert rules (POST /v1/alert-rules).</p>`}
    <h2>History</h2><${Problem} error=${alerts.error} />
    <table aria-label="Alert history"><thead><tr><th>Fired</th><th>Flow</th><th>Kind</th><th>Reason</th><th>Run</th><th>Status</th><th>Resolved</th></tr></thead>
    <tbody>${rows(alerts).map((a) => html`<tr><td>${time(a.fired_at)}</td><td>${a.flow_id}</td><td>${a.kind}</td><td>${a.reason}</td>
      <td><${RunLink} id=${a.run_id} /></td><td>${a.status}</td><td>${time(a.resolved_at)}</td></tr>`)}</tbody></table>`;
}
