// A failed run's diagnosis on its page (docs/runs.md#diagnosis): the root cause, the next action, the pattern across
// the flow's runs, the dependency's health and each rule that fired with what it saw (GET /v1/runs/{id}/diagnosis).

import { get } from "./api.js";
import { Problem, RunLink, html, time, useLoad } from "./ui.js";

// The statuses a run gets a diagnosis in (services/api/diagnosis.py DIAGNOSED).
export const DIAGNOSED = new Set(["FAILED", "TIMED_OUT", "INTERNAL_ERROR", "PARTIAL", "INVALID", "QUOTA_EXCEEDED"]);
const CAUSES = {
  upstream_service_error: "upstream service error", auth_or_config: "auth or configuration",
  data_validation: "data / validation", timing_timeout: "timing / timeout", flowtrail_bug: "Flowtrail bug",
};

function History({ h }) {
  const since = h.since_version ? `, since version ${h.since_version}` : "";
  const retried = h.passed_on_retry ? `, ${h.passed_on_retry} passed on retry` : "";
  const seen = `${h.occurrences} of the last ${h.runs} runs${since}${retried}; first seen ${time(h.first_seen)}`;
  return html`${seen}${h.first_seen_run_id && html` in <${RunLink} id=${h.first_seen_run_id} />`}`;
}

export function DiagnosisPanel({ id, version }) {
  const answer = useLoad(() => get(`/v1/runs/${encodeURIComponent(id)}/diagnosis`), [id, version]);
  const found = answer.data && answer.data.diagnosis;
  if (!found) return html`<${Problem} error=${answer.error} />`;
  const { history: h, dependency: dep, assertion: a, error: e } = found;
  return html`<section class="card" aria-label="Diagnosis">
    <h2>Diagnosis: <span data-testid="root-cause">${CAUSES[found.root_cause]}</span></h2>
    <p data-testid="next-action">${found.next_action}</p>
    <dl class="kv">
      <dt>error</dt><dd>${found.step && html`<b>${found.step.name}</b>: `}${e.message}
        <span class="muted">${` ${e.category || ""} · fingerprint ${e.fingerprint || "–"}`}</span></dd>
      ${a && html`<dt>assertion</dt><dd class="mono" data-testid="diagnosis-assertion">${`${a.expression} ${a.operator} ${
        JSON.stringify(a.expected)}, actual ${JSON.stringify(a.actual)}`}</dd>`}
      ${h && html`<dt>history</dt><dd><${History} h=${h} /></dd>`}
      ${dep && html`<dt>${dep.kind} ${dep.name}</dt><dd>${`for other runs ${time(dep.window_from)} – ${time(dep.window_to)}: ${
        dep.failures} failed, ${dep.successes} succeeded${dep.status ? ` · ${dep.status}` : ""}`}</dd>`}
    </dl>
    <table aria-label="Evidence"><thead><tr><th>Rule</th><th>Points to</th><th>Weight</th><th>Saw</th></tr></thead>
      <tbody>${found.evidence.map((r) => html`<tr><td title=${r.says}>${r.rule}</td><td>${CAUSES[r.supports]}</td>
        <td>${r.weight}</td><td class="mono">${JSON.stringify(r.observed)}</td></tr>`)}</tbody></table>
  </section>`;
}
