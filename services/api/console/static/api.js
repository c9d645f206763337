// The console's one door to the public HTTP API (docs/console.md): the bearer key kept in sessionStorage, errors
// shown as a person expects them (a refused key signs out; 429 waits for Retry-After and says so).

const KEY = "flowtrail.key";
const SESSION = "flowtrail.session"; // the key's GET /v1/session answer: tenant, environment, scopes, the key itself

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  // null until GET /v1/session has answered for this key (`loadSession`).
  get info() { return JSON.parse(sessionStorage.getItem(SESSION) || "null"); },
  get scopes() { return (this.info || { scopes: [] }).scopes; },
  can(scope) { const s = this.scopes; return s.includes(scope) || s.includes("admin"); },
  get environment() { return (this.key || "").startsWith("ft_test_") ? "TESTING" : "PRODUCTION"; },
};

export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// Page-wide messages (a rate limit wait, a refused key): the app shows the latest one.
export function notify(message, kind = "info") {
  window.dispatchEvent(new CustomEvent("ft-notice", { detail: { message, kind } }));
}

export function signOut(reason) {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(SESSION);
  window.dispatchEvent(new CustomEvent("ft-signed-out", { detail: { reason } }));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A query string from an object: arrays repeat their name, empty values are left out.
export function qs(params = {}) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const v of Array.isArray(value) ? value : [value]) {
      if (v !== undefined && v !== null && v !== "") q.append(name, String(v));
    }
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

async function send(method, path, body, key, signal, extra) {
  const headers = { ...extra, Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
}

// `path` is the API's (same origin) or a whole URL (ingest's triggers, docs/console.md).
export async function api(method, path, body, { signal, key = session.key, headers } = {}) {
  for (let attempt = 1; ; attempt++) {
    const r = await send(method, path, body, key, signal, headers);
    if (r.status === 429 && attempt <= 3) {
      const wait = Math.max(1, Number(r.headers.get("Retry-After")) || 1);
      notify(`Too many requests for this key: retrying in ${wait} s.`, "warn");
      await sleep(wait * 1000);
      continue;
    }
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { error: { message: text } }; }
    if (r.status === 401 && key === session.key) signOut("Your API key was refused (expired, revoked or rotated out): sign in again.");
    if (!r.ok) {
      const error = (data && data.error) || {};
      const retryAfter = r.headers.get("Retry-After");
      const message = r.status === 429 ? `Too many requests: try again in ${retryAfter || "a few"} s.` : error.message || r.statusText;
      throw new ApiError(r.status, error.code, message, retryAfter);
    }
    return data;
  }
}

export const get = (path, params, options) => api("GET", path + qs(params), undefined, options);
export const post = (path, body, options) => api("POST", path, body ?? {}, options);

// Signs in: the key must be accepted; its session (GET /v1/session) says which buttons appear.
export async function signIn(key) {
  const info = await get("/v1/session", {}, { key });
  sessionStorage.setItem(KEY, key);
  sessionStorage.setItem(SESSION, JSON.stringify(info));
}

// The session of a tab that has a key but not yet its session (opened signed in): asked once, kept like sign-in's.
export async function loadSession() {
  const key = session.key;
  const info = await get("/v1/session");
  if (session.key === key) sessionStorage.setItem(SESSION, JSON.stringify(info));
  return info;
}

// The deployment's addresses (GET /console/config.json): ingest's, where triggers go. Asked once per page.
let config = null;
export function consoleConfig() {
  config ??= fetch("/console/config.json").then((r) => {
    if (!r.ok) throw new Error(`the console's configuration answered ${r.status}`);
    return r.json();
  }).catch((error) => { config = null; throw error; });
  return config;
}

// Server-Sent Events read with fetch (EventSource cannot send the bearer key): calls onEvent({id, event, data})
// for each, reconnects with Last-Event-ID when the connection drops, stops when `signal` aborts or the stream ends
// on its own (`untilEnd`: a run's stream ends after its final status).
export async function stream(path, onEvent, signal, { untilEnd = false } = {}) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${session.key}`, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const r = await fetch(path, { headers, signal });
      if (r.status === 401) { signOut("Your API key was refused: sign in again."); return; }
      if (!r.ok) throw new Error(`stream answered ${r.status}`);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const message = { id: null, event: "message", data: "" };
          for (const line of block.split("\n")) {
            const colon = line.indexOf(":");
            if (colon === 0) continue; // a comment (keep-alive ping)
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "data") message.data += (message.data ? "\n" : "") + text;
            else if (field === "id") message.id = text;
            else if (field === "event") message.event = text;
          }
          if (message.id !== null) lastId = message.id;
          if (message.data) onEvent({ ...message, data: JSON.parse(message.data) });
        }
      }
      if (untilEnd) return;
    } catch (error) {
      if (signal.aborted) return;
    }
    await sleep(1000);
  }
}
