// Shared pieces of the console's views: the html tag, formatting, status badges and icons, data loading.

import { h } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import htm from "htm";

export const html = htm.bind(h);

export const TERMINAL = new Set(["SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INTERNAL_ERROR", "INVALID"]);
export const FAILED = new Set(["PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INTERNAL_ERROR"]);
// The run statuses, and the product documents' words for some of them (docs/origins.md), for the status filter.
export const STATUSES = [
  ["QUEUED"], ["SCHEDULED"], ["BLOCKED"], ["QUOTA_EXCEEDED"], ["INVALID"], ["RUNNING"], ["PAUSED"],
  ["SUCCEEDED", "passed"], ["PARTIAL", "partially succeeded"], ["FAILED", "failed"], ["TIMED_OUT", "timed out"],
  ["CANCELED", "cancelled"], ["INTERNAL_ERROR", "error"],
];
export const TRIGGER_TYPES = ["api", "manual", "schedule", "webhook", "kafka", "retry", "subflow"];

// Step status icons (the product documents' execution view): ✓ passed, ✗ failed, ⚡ skipped, ↻ retrying.
const ICONS = { SUCCEEDED: "✓", FAILED: "✗", SKIPPED: "⚡", RETRYING: "↻", RUNNING: "…", PENDING: "·", CANCELED: "✗" };

export function Icon({ status }) {
  return html`<span class=${`icon ${status}`} role="img" aria-label=${status.toLowerCase()}>${ICONS[status] || "?"}</span>`;
}

export function Status({ status }) {
  return html`<span class=${`status ${status}`} data-status=${status}>${status}</span>`;
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1000) return `${Math.round(value)} ms`;
  if (value < 60000) return `${(value / 1000).toFixed(value < 10000 ? 2 : 1)} s`;
  const minutes = Math.floor(value / 60000);
  return minutes < 60 ? `${minutes} min ${Math.round((value % 60000) / 1000)} s` : `${(minutes / 60).toFixed(1)} h`;
}

export function time(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

export function Json({ value, label }) {
  if (value === undefined || value === null) return html`<span class="muted">none</span>`;
  const text = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  return html`<pre aria-label=${label}>${text}</pre>`;
}

export function RunLink({ id }) {
  return id ? html`<a class="mono" href=${`#/runs/${encodeURIComponent(id)}`}>${id}</a>` : html`<span class="muted">–</span>`;
}

// Loads `load()` when `deps` change; {data, error, loading, reload, setData}. A newer load wins over an older one.
export function useLoad(load, deps) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const generation = useRef(0);
  const reload = useCallback(async () => {
    const mine = ++generation.current;
    setState((s) => ({ ...s, loading: true }));
    try {
      const data = await load();
      if (mine === generation.current) setState({ data, error: null, loading: false });
    } catch (error) {
      if (mine === generation.current) setState((s) => ({ ...s, error, loading: false }));
    }
  }, deps);
  useEffect(() => { reload(); }, [reload]);
  const setData = (update) => setState((s) => ({ ...s, data: typeof update === "function" ? update(s.data) : update }));
  return { ...state, reload, setData };
}

export function Problem({ error }) {
  if (!error) return null;
  return html`<p class="notice error" role="alert">${error.message}${error.status ? ` (${error.status})` : ""}</p>`;
}

// A confirmation dialog: `open` shows it modally; the answer goes to onClose(true | false).
export function Confirm({ open, title, children, confirmLabel = "Confirm", onClose }) {
  const ref = useRef(null);
  useEffect(() => {
    const dialog = ref.current;
    if (open && dialog && !dialog.open) dialog.showModal();
    if (!open && dialog && dialog.open) dialog.close();
  }, [open]);
  return html`<dialog ref=${ref} aria-label=${title} onCancel=${() => onClose(false)}>
    <h2>${title}</h2>
    ${children}
    <div class="actions" style="margin-top: 1rem">
      <button class="primary" onClick=${() => onClose(true)}>${confirmLabel}</button>
      <button onClick=${() => onClose(false)}>Cancel</button>
    </div>
  </dialog>`;
}

// The location hash as a route: "#/runs/abc?x=1" → {parts: ["runs", "abc"], params: URLSearchParams}.
export function route() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query) };
}

export function go(hash) {
  if (location.hash !== hash) location.hash = hash;
}
