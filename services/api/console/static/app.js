// The console's shell (docs/console.md): sign-in, the navigation, the page for the location hash, notices.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { loadSession, session, signIn, signOut } from "./api.js";
import { html, route } from "./ui.js";
import { RunsPage } from "./runs.js";

// Pages other than the runs list load when first opened.
const LAZY = {
  runs: () => import("./run.js").then((m) => m.RunPage),
  flows: () => import("./flows.js").then((m) => m.FlowsPage),
  analytics: () => import("./analytics.js").then((m) => m.AnalyticsPage),
  connectors: () => import("./admin.js").then((m) => m.ConnectorsPage),
  webhooks: () => import("./admin.js").then((m) => m.WebhooksPage),
  alerts: () => import("./admin.js").then((m) => m.AlertsPage),
};
const NAV = [["runs", "Runs"], ["flows", "Flows"], ["analytics", "Analytics"], ["connectors", "Connectors"],
  ["webhooks", "Webhooks"], ["alerts", "Alerts"]];

function SignIn({ reason, onDone }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  async function submit(event) {
    event.preventDefault();
    const key = new FormData(event.target).get("key").trim();
    setBusy(true);
    try {
      await signIn(key);
      onDone();
    } catch (e) {
      setError(e.status === 401 ? "This key was refused: check it, or ask for a new one." : e.message);
    } finally {
      setBusy(false);
    }
  }
  return html`<main class="signin card">
    <h1>Sign in to Flowtrail</h1>
    ${reason && html`<p class="notice" role="status">${reason}</p>`}
    <form onSubmit=${submit}>
      <label>API key
        <input name="key" type="password" autocomplete="off" required placeholder="ft_live_… or ft_test_…" autofocus />
      </label>
      <p class="muted">The key stays in this browser tab only (session storage). <code>flowtrail up</code> prints one
        and saves it in <code>.state/api_key</code>.</p>
      ${error && html`<p class="notice error" role="alert">${error}</p>`}
      <button class="primary" type="submit" disabled=${busy}>Sign in</button>
    </form>
  </main>`;
}

function Lazy({ name, props }) {
  const [Page, setPage] = useState(null);
  useEffect(() => {
    let live = true;
    LAZY[name]().then((page) => live && setPage(() => page));
    return () => { live = false; };
  }, [name]);
  return Page ? html`<${Page} ...${props} />` : html`<p class="muted">Loading…</p>`;
}

function Page({ where }) {
  const [section, id] = where.parts;
  if (!section || (section === "runs" && !id)) return html`<${RunsPage} params=${where.params} />`;
  if (section === "runs") return html`<${Lazy} key=${`run:${id}`} name="runs" props=${{ id, params: where.params }} />`;
  if (LAZY[section]) return html`<${Lazy} key=${section} name=${section} props=${{ id, params: where.params }} />`;
  return html`<p>No such page. <a href="#/runs">Runs</a></p>`;
}

function App() {
  const [signedIn, setSignedIn] = useState(Boolean(session.key));
  const [reason, setReason] = useState(null);
  const [where, setWhere] = useState(route());
  const [notice, setNotice] = useState(null);
  const [who, setWho] = useState(session.info);
  // A tab opened with a key but without its session asks for it; the pages show meanwhile, their write buttons
  // once it is known.
  useEffect(() => {
    if (signedIn && !who) loadSession().then(setWho, () => {});
  }, [signedIn, who]);
  useEffect(() => {
    const onHash = () => setWhere(route());
    const onOut = (e) => { setReason(e.detail.reason); setSignedIn(false); setWho(null); };
    let timer;
    const onNotice = (e) => { setNotice(e.detail); clearTimeout(timer); timer = setTimeout(() => setNotice(null), 8000); };
    window.addEventListener("hashchange", onHash);
    window.addEventListener("ft-signed-out", onOut);
    window.addEventListener("ft-notice", onNotice);
    return () => {
      window.removeEventListener("hashchange", onHash);
      window.removeEventListener("ft-signed-out", onOut);
      window.removeEventListener("ft-notice", onNotice);
    };
  }, []);
  if (!signedIn) {
    return html`<${SignIn} reason=${reason} onDone=${() => { setReason(null); setWho(session.info); setSignedIn(true); }} />`;
  }
  const section = where.parts[0] || "runs";
  return html`
    <header class="top">
      <a class="brand" href="#/runs">Flowtrail</a>
      <nav aria-label="Sections">
        ${NAV.map(([name, label]) => html`<a href=${`#/${name}`} aria-current=${section === name ? "page" : undefined}
          style="margin-right: 1rem">${label}</a>`)}
      </nav>
      <div class="who">
        ${who && html`<span class="muted" title=${`Signed in with key ${who.key.id} (${who.key.scopes.join(", ")})`}>
          ${who.tenant_id} · ${who.key.name || who.key.prefix + "…"}</span>`}
        <span title="The key's environment: a TESTING key sees TESTING data">${session.environment}</span>
        <button onClick=${() => signOut("Signed out.")}>Sign out</button>
      </div>
    </header>
    ${notice && html`<div class=${`notice ${notice.kind}`} role="status">${notice.message}</div>`}
    <main><${Page} where=${where} /></main>`;
}

const root = document.getElementById("app");
root.textContent = "";
render(html`<${App} />`, root);
