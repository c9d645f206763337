// The right panel of a run's detail: the selected step's input and output by action type, its assertions,
// extractions and every attempt (docs/console.md).

import { Icon, Json, RunLink, Status, html, ms, time } from "./ui.js";

function Fields({ rows }) {
  const shown = rows.filter(([, v]) => v !== undefined && v !== null && v !== "");
  return html`<dl class="kv">${shown.map(([k, v]) => html`<dt>${k}</dt><dd>${typeof v === "object" ? html`<${Json} value=${v} label=${k} />` : String(v)}</dd>`)}</dl>`;
}

// Input and output laid out for what the action does; anything else as JSON.
function Anatomy({ step }) {
  const input = step.input || {};
  const output = step.output || {};
  if (step.action === "http_request") {
    const request = output.request || {};
    return html`<h3>Request</h3>
      <${Fields} rows=${[["method", request.method || input.method], ["URL", request.url || input.url],
        ["headers", request.headers || input.headers], ["body", input.body ?? input.json]]} />
      <h3>Response</h3>
      <${Fields} rows=${[["status", output.status], ["headers", output.headers], ["body", output.body]]} />`;
  }
  if (step.action === "database_query") {
    return html`<h3>Query</h3>
      <${Fields} rows=${[["connection", input.connector || input.dsn], ["SQL", input.sql || input.query], ["parameters", input.params || input.parameters]]} />
      <h3>Result</h3>
      <${Fields} rows=${[["rows", output.rows], ["row count", output.row_count ?? output.rowcount], ["other", { ...output, rows: undefined }]]} />`;
  }
  if (step.action === "kafka_produce" || step.action === "kafka_consume") {
    return html`<h3>Message</h3>
      <${Fields} rows=${[["topic", input.topic || output.topic], ["key", input.key ?? output.key], ["value", input.value ?? output.value],
        ["partition", output.partition], ["offset", output.offset], ["messages", output.messages]]} />`;
  }
  if (step.action === "human_input") {
    return html`<h3>Question</h3><${Fields} rows=${[["question", input.question], ["fields", input.fields]]} />
      <h3>Answer</h3><${Json} value=${step.output} label="answer" />`;
  }
  if (step.action === "subflow") {
    return html`<h3>Child run</h3>
      <${Fields} rows=${[["flow", input.flow_id], ["input", input.input]]} />
      ${output.child_run_id && html`<p>Child: <${RunLink} id=${output.child_run_id} /> ${output.status && html`<${Status} status=${output.status} />`}</p>`}`;
  }
  return html`<h3>Input</h3><${Json} value=${step.input} label="input" /><h3>Output</h3><${Json} value=${step.output} label="output" />`;
}

function Assertions({ items }) {
  if (!items || !items.length) return null;
  return html`<h3>Assertions</h3>
    <table aria-label="Assertions"><thead><tr><th></th><th>Expression</th><th>Operator</th><th>Expected</th><th>Actual</th></tr></thead>
    <tbody>${items.map((a) => html`<tr data-passed=${String(a.passed)}>
      <td><span class=${`status ${a.passed ? "passed" : "failed"}`}>${a.passed ? "pass" : "fail"}</span></td>
      <td class="mono">${a.expression}</td><td>${a.operator}</td>
      <td class="mono" data-testid="expected">${JSON.stringify(a.expected)}</td>
      <td class="mono" data-testid="actual">${JSON.stringify(a.actual)}</td></tr>`)}</tbody></table>`;
}

function Extractions({ values }) {
  const entries = Object.entries(values || {});
  if (!entries.length) return null;
  return html`<h3>Extractions</h3><${Fields} rows=${entries} />`;
}

function Attempts({ attempts }) {
  if (!attempts || !attempts.length) return null;
  return html`<h3>Attempts</h3>
    <table aria-label="Attempts"><thead><tr><th>#</th><th>Status</th><th>Duration</th><th>Error</th><th>Retry at</th></tr></thead>
    <tbody>${attempts.map((a) => html`<tr><td>${a.attempt}</td><td><${Status} status=${a.status} /></td><td>${ms(a.duration_ms)}</td>
      <td>${a.error ? html`<span class="mono">${a.error.category ? `${a.error.category}: ` : ""}${a.error.message || JSON.stringify(a.error)}</span>` : ""}</td>
      <td>${time(a.retry_at)}</td></tr>`)}</tbody></table>`;
}

export function StepPanel({ step }) {
  if (!step) return html`<section class="card" aria-label="Step"><p class="muted">Select a step on the left.</p></section>`;
  return html`<section class="card" aria-label=${`Step ${step.name}`}>
    <h2><${Icon} status=${step.status} /> ${step.name} <span class="muted">${step.action}</span></h2>
    <${Fields} rows=${[["status", step.status], ["attempt", step.attempt], ["duration", ms(step.duration_ms)],
      ["started", time(step.started_at)], ["finished", step.finished_at && time(step.finished_at)], ["skipped because", step.reason]]} />
    ${step.reused_from && html`<p>Reused the output of this step in <${RunLink} id=${step.reused_from} />.</p>`}
    ${step.error && html`<p class="notice error" role="alert">${step.error.category ? `${step.error.category}: ` : ""}${step.error.message || JSON.stringify(step.error)}</p>`}
    <${Anatomy} step=${step} />
    <${Assertions} items=${step.assertions} />
    <${Extractions} values=${step.extractions} />
    <${Attempts} attempts=${step.attempts} />
  </section>`;
}
