"""Alerts end to end on the real broker and database, with the projector and the API as processes: each rule
kind fires exactly the alerts a workload should trip and stays quiet on one that should not; the webhook,
Slack, PagerDuty and email channels each get their payload shape (a local HTTP server and a local SMTP
server stand in for them); a rebuild derives the same history from the ledger and sends nothing again;
tenants never see each other's rules or alerts."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from schemas import events as ev
from schemas.events import EventBase
from services.common.webhooks import verify
from services.projector import rebuild
from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import (
    LOOPBACK_WEBHOOKS,
    Env,
    KeySpec,
    answer,
    append_ledger,
    connected,
    first_calls,
    projector_settings,
    running,
    stub_upstream,
    wait_sql,
    wait_until,
)

SECRET = "whsec_alerts_0123456789abcdef"
ROUTING_KEY = "R0UTING0KEY0123456789abcdef0123"


async def pagerduty(request: web.Request) -> web.Response:
    """PagerDuty's Events API: 202 naming the dedup key."""
    body = orjson.loads(await request.read())
    return web.json_response({"status": "success", "dedup_key": body["dedup_key"]}, status=202)


# Local stand-ins (env.upstream) for a webhook receiver, a Slack incoming webhook and PagerDuty's Events API. Slack
# answers 500 to the first attempt of every message, so retries show in the attempt log.
INBOX = {
    ("POST", "/webhook"): answer("ok"),
    ("POST", "/slack"): first_calls(1, answer("try later", 500), answer("ok"), per=lambda call: call.body),
    ("POST", "/pagerduty"): pagerduty,
}


def requests(env: Env, name: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """What the stand-in `name` was sent, in order: (headers, JSON body)."""
    return [(dict(c.headers), c.json()) for c in env.upstream.seen(f"/{name}")]


def bodies(env: Env, name: str) -> list[dict[str, Any]]:
    return [body for _, body in requests(env, name)]


def counts(env: Env) -> dict[str, int]:
    """How many requests each stand-in was sent."""
    return dict(Counter(c.path.removeprefix("/") for c in env.upstream.requests))


@dataclass
class SmtpInbox:
    """A tiny SMTP receiver: enough of RFC 5321 for smtplib's EHLO, MAIL, RCPT, DATA, QUIT."""

    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 inbox.test ESMTP\r\n")
        recipients: list[str] = []
        while line := await reader.readline():
            verb = line[:4].decode().upper()
            if verb == "RCPT":
                recipients.append(line.decode().split(":", 1)[1].strip().strip("<>"))
            if verb == "DATA":
                writer.write(b"354 end with <CRLF>.<CRLF>\r\n")
                await writer.drain()
                data = await reader.readuntil(b"\r\n.\r\n")
                message = email.message_from_bytes(data[:-5], policy=email.policy.default)
                assert isinstance(message, EmailMessage)
                self.messages.append((recipients, message))
                recipients = []
            if verb == "QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            writer.write(b"250 ok\r\n" if verb != "DATA" else b"250 queued\r\n")
            await writer.drain()
        writer.close()

    def subjects(self) -> list[str]:
        return [str(m["Subject"]) for _, m in self.messages]


@pytest.fixture(scope="module")
async def smtp() -> AsyncIterator[SmtpInbox]:
    inbox = SmtpInbox()
    server = await asyncio.start_server(inbox.handle, "127.0.0.1", 0)
    inbox.port = server.sockets[0].getsockname()[1]
    try:
        yield inbox
    finally:
        server.close()


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory, smtp: SmtpInbox) -> AsyncIterator[Env]:
    keys: dict[str, KeySpec | str] = {"admin": "t1", "other": "t2", "reader": KeySpec("t1", scopes=("runs:read",))}
    settings = {
        **LOOPBACK_WEBHOOKS, "FLOWTRAIL_PROJECTOR_ALERT_BACKOFF_S": "0.2", "FLOWTRAIL_PROJECTOR_ALERT_POLL_S": "0.05",
        "FLOWTRAIL_PROJECTOR_ALERT_CLOCK_S": "0.3",
        "FLOWTRAIL_PROJECTOR_SMTP_HOST": "127.0.0.1", "FLOWTRAIL_PROJECTOR_SMTP_PORT": str(smtp.port),
        "FLOWTRAIL_PROJECTOR_SMTP_FROM": "alerts@flowtrail.test",
    }  # fmt: skip
    async with (
        stub_upstream(INBOX) as inbox,
        running(infra, tmp_path_factory, keys=keys, services=("projector", "api"), env=settings, upstream=inbox) as env,
    ):
        yield env


def finished(run_id: str, status: str, at: datetime, *, flow: str, tenant: str = "t1") -> list[EventBase]:
    """A one-step run whose terminal event (SUCCEEDED, PARTIAL or FAILED) happens exactly at `at`."""
    start = at - timedelta(milliseconds=50)
    events = run_events(run_id, tenant_id=tenant, flow_id=flow, steps=1, fail_at=0 if status == "FAILED" else None,
                        start=start)  # fmt: skip
    if status == "PARTIAL":
        events[-1] = ev.RunPartiallySucceeded.model_validate(
            {**events[-1].model_dump(), "type": "RunPartiallySucceeded"}
        )
    assert events[-1].occurred_at == at
    return events


async def play(env: Env, runs: list[tuple[str, str, datetime, str]], tenant: str = "t1") -> None:
    """(run id, status, finished at, flow) in order; returns once every run is projected (alert rules are
    evaluated in the same transaction). One partition, so the log order is the order given."""
    events = [e for run_id, status, at, flow in runs for e in finished(run_id, status, at, flow=flow, tenant=tenant)]
    await append_ledger(env.sandbox, events, partitions=1)
    ids = [r[0] for r in runs]
    async with connected(env) as db:
        await wait_sql(db, "SELECT count(*) = $2 FROM runs WHERE id = ANY($1::text[]) AND finished_at IS NOT NULL",
                       ids, len(ids), what=f"{len(ids)} runs projected", logs=env.log_tails)  # fmt: skip


def series(prefix: str, flow: str, statuses: str, t0: datetime, *, every: timedelta = timedelta(minutes=1)
           ) -> list[tuple[str, str, datetime, str]]:  # fmt: skip
    """'SPF' → SUCCEEDED, PARTIAL, FAILED runs `every` apart after t0."""
    names = {"S": "SUCCEEDED", "P": "PARTIAL", "F": "FAILED"}
    return [(f"{prefix}{i}", names[c], t0 + every * (i + 1), flow) for i, c in enumerate(statuses)]


async def new_rule(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await api.post("/v1/alert-rules", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def alerts_of(api: httpx.AsyncClient, rule: dict[str, Any]) -> list[dict[str, Any]]:
    r = await api.get("/v1/alerts", params={"rule_id": rule["id"], "limit": 200})
    assert r.status_code == 200, r.text
    return sorted(r.json()["data"], key=lambda a: a["fired_at"])


def at(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


async def test_failed_runs_alert_every_channel_in_its_own_shape(env: Env, smtp: SmtpInbox) -> None:
    async with env.client() as api:
        channels = [
            {"type": "webhook", "url": f"{env.upstream.url}/webhook"},
            {"type": "slack", "url": f"{env.upstream.url}/slack"},
            {"type": "pagerduty", "routing_key": ROUTING_KEY, "url": f"{env.upstream.url}/pagerduty",
             "severity": "critical"},
            {"type": "email", "to": ["oncall@example.com", "ops@example.com"]},
        ]  # fmt: skip
        rule = await new_rule(api, name="Orders sync broke", flow_id="f-fail", kind="failed_run", channels=channels,
                              secret=SECRET)  # fmt: skip
        assert rule["secret"] == SECRET and rule["state"]["open"] is False
        calm = await new_rule(api, flow_id="f-calm", kind="failed_run", channels=channels[1:2])
        t0 = datetime.now(UTC)
        runs = series("fail", "f-fail", "SFSPF", t0) + series("calm", "f-calm", "SPS", t0)
        await play(env, runs)
        # Another tenant's failure of a flow with the same id is not t1's business.
        await play(env, series("other", "f-fail", "F", t0), tenant="t2")

        fired = await alerts_of(api, rule)
        assert [a["run_id"] for a in fired] == ["fail1", "fail4"]
        first, second = fired
        assert first["status"] == "resolved" and first["resolved_by_run_id"] == "fail2"
        assert at(first["fired_at"]) == t0 + timedelta(minutes=2) and at(first["resolved_at"]) == t0 + timedelta(
            minutes=3
        )
        assert second["status"] == "open" and second["resolved_at"] is None
        assert "run fail1 of flow f-fail ended FAILED: step0 rejected the record" in first["reason"]
        assert await alerts_of(api, calm) == []

        async def all_delivered() -> list[dict[str, Any]] | None:
            out = []
            for a in fired:
                out += (await api.get(f"/v1/alerts/{a['id']}")).json()["deliveries"]
            return out if len(out) == 12 and all(d["status"] == "delivered" for d in out) else None

        deliveries = await wait_until(all_delivered, logs=env.log_tails)
    # Fired, resolved, fired: three messages per channel, each attempt logged with its answer.
    assert sorted(d["action"] for d in deliveries).count("resolve") == 4
    answers = {"webhook": [200], "slack": [500, 200], "pagerduty": [202], "email": [None]}
    for d in deliveries:
        assert [a["status_code"] for a in d["attempt_log"]] == answers[d["channel_type"]], d

    hooks = requests(env, "webhook")
    assert sorted((h["X-Flowtrail-Event"], b["data"]["alert"]["id"]) for h, b in hooks) == sorted(
        [("alert.fired", first["id"]), ("alert.resolved", first["id"]), ("alert.fired", second["id"])]
    )
    for (headers, body), raw in zip(hooks, [c.body for c in env.upstream.seen("/webhook")], strict=True):
        assert verify(SECRET, raw, headers["X-Flowtrail-Signature"])
        assert not verify("whsec_someone_else_entirely", raw, headers["X-Flowtrail-Signature"])
        assert headers["X-Flowtrail-Delivery"] == body["id"]
        assert body["data"]["rule"] == {"id": rule["id"], "name": "Orders sync broke", "kind": "failed_run",
                                        "flow_id": "f-fail"}  # fmt: skip

    slack = bodies(env, "slack")
    assert not any("f-calm" in b["text"] for b in slack)
    fired_texts = {b["text"] for b in slack if b["text"].startswith("[FIRING]")}
    assert fired_texts == {f"[FIRING] Orders sync broke: {first['reason']}",
                           f"[FIRING] Orders sync broke: {second['reason']}"}  # fmt: skip
    assert {b["text"] for b in slack if b["text"].startswith("[RESOLVED]")} == {
        f"[RESOLVED] Orders sync broke: {first['reason']}"
    }
    for b in slack:
        assert b["blocks"][0] == {"type": "section", "text": {"type": "mrkdwn", "text": b["text"]}}
        assert "*Flow:* `f-fail`" in [e["text"] for e in b["blocks"][1]["elements"]]

    pd = bodies(env, "pagerduty")
    triggers = sorted((b for b in pd if b["event_action"] == "trigger"), key=lambda b: b["payload"]["timestamp"])
    assert [b["dedup_key"] for b in triggers] == [first["id"], second["id"]]
    for b, a in zip(triggers, fired, strict=True):
        assert b["routing_key"] == ROUTING_KEY
        assert b["payload"]["summary"] == f"Orders sync broke: {a['reason']}"
        assert b["payload"]["source"] == "flowtrail/t1/f-fail" and b["payload"]["severity"] == "critical"
        assert at(b["payload"]["timestamp"]) == at(a["fired_at"])
        assert b["payload"]["custom_details"]["run_id"] == a["run_id"]
    assert [b for b in pd if b["event_action"] == "resolve"] == [
        {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": first["id"]}
    ]

    assert sorted(smtp.subjects()) == sorted(
        ["[Flowtrail] FIRING: Orders sync broke (f-fail)"] * 2 + ["[Flowtrail] RESOLVED: Orders sync broke (f-fail)"]
    )
    for recipients, message in smtp.messages:
        assert recipients == ["oncall@example.com", "ops@example.com"]
        assert message["From"] == "alerts@flowtrail.test" and message["To"] == "oncall@example.com, ops@example.com"
    text = next(m.get_content() for _, m in smtp.messages if "RESOLVED" in str(m["Subject"]))
    assert first["reason"] in text and "Run:   fail1" in text and "by run fail2" in text


async def test_consecutive_partial_fires_once_at_the_nth_and_a_success_resets(env: Env) -> None:
    async with env.client() as api:
        rule = await new_rule(api, flow_id="f-part", kind="consecutive_partial", n=3)
        broken = await new_rule(api, flow_id="f-part-broken", kind="consecutive_partial", n=3)
        t0 = datetime.now(UTC)
        # Two PARTIALs, a success, two PARTIALs: never three in a row. A FAILED breaks a streak too.
        await play(env, series("part", "f-part", "PPSPP", t0) + series("pb", "f-part-broken", "PPFPPSPP", t0))
        assert await alerts_of(api, rule) == [] and await alerts_of(api, broken) == []
        assert (await api.get(f"/v1/alert-rules/{rule['id']}")).json()["state"]["consecutive_partial"] == 2

        # The third in a row fires; the fourth adds nothing; a success resolves it.
        await play(env, series("part", "f-part", "PPSPPPPS", t0)[5:])
        fired = await alerts_of(api, rule)
        assert [(a["run_id"], a["resolved_by_run_id"]) for a in fired] == [("part5", "part7")]
        assert fired[0]["reason"] == "3 consecutive PARTIAL runs of flow f-part"
        assert fired[0]["payload"]["consecutive"] == 3
        assert await alerts_of(api, broken) == []


async def test_failure_rate_burns_over_a_sliding_window(env: Env) -> None:
    async with env.client() as api:
        body = {"kind": "failure_rate", "threshold": 0.5, "window_minutes": 10, "min_runs": 4}
        calm = await new_rule(api, flow_id="f-rate-calm", **body)
        burn = await new_rule(api, flow_id="f-rate", **body)
        slide = await new_rule(api, flow_id="f-rate-slide", **{**body, "window_minutes": 5})
        t0 = datetime.now(UTC)
        m = timedelta(minutes=1)
        sliding = [("slide0", "FAILED", t0 + 0 * m), ("slide1", "FAILED", t0 + 1 * m), ("slide2", "FAILED", t0 + 2 * m),
                   ("slide3", "SUCCEEDED", t0 + 10 * m), ("slide4", "SUCCEEDED", t0 + 11 * m),
                   ("slide5", "FAILED", t0 + 12 * m), ("slide6", "FAILED", t0 + 13 * m)]  # fmt: skip
        await play(
            env,
            series("calm", "f-rate-calm", "SSFSSFSS", t0)  # at most 33% failed
            + series("burn", "f-rate", "FFSFFSSSS", t0)  # 3 of 4 → fires; 4 of 9 → resolves
            + [(r, s, t, "f-rate-slide") for r, s, t in sliding],
        )
        assert await alerts_of(api, calm) == []
        fired = await alerts_of(api, burn)
        assert [(a["run_id"], a["resolved_by_run_id"]) for a in fired] == [("burn3", "burn8")]
        assert fired[0]["payload"] | {"failed": 3, "runs": 4, "failure_rate": 0.75} == fired[0]["payload"]
        assert fired[0]["reason"] == "3 of 4 runs of flow f-rate failed in 10 min (75% ≥ 50%)"
        # Counted from the start, 3 of the first 4 failed; over 5 minutes only the last 4 runs are ever enough.
        slid = await alerts_of(api, slide)
        assert [(a["run_id"], a["payload"]["failed"], a["payload"]["runs"]) for a in slid] == [("slide6", 2, 4)]


async def test_no_success_counts_silence_in_event_time_and_by_the_clock(env: Env) -> None:
    async with env.client() as api:
        silent = await new_rule(api, flow_id="f-silent", kind="no_success", minutes=5)
        busy = await new_rule(api, flow_id="f-busy", kind="no_success", minutes=5)
        t0 = datetime.now(UTC)
        m = timedelta(minutes=1)
        silence = [("sil0", "SUCCEEDED", t0 + m, "f-silent"), ("sil1", "FAILED", t0 + 4 * m, "f-silent"),
                   ("sil2", "SUCCEEDED", t0 + 5 * m, "f-silent")]  # fmt: skip
        await play(env, [*silence, *series("busy", "f-busy", "SFSSFSSS", t0, every=2 * m)])
        assert await alerts_of(api, silent) == []
        # The next run comes 6 minutes after the last success: the silence crossed 5 minutes at t0+10m.
        await play(env, [("sil3", "FAILED", t0 + 11 * m, "f-silent"), ("sil4", "SUCCEEDED", t0 + 13 * m, "f-silent")])
        fired = await alerts_of(api, silent)
        assert [(at(a["fired_at"]), a["run_id"], at(a["resolved_at"]), a["resolved_by_run_id"]) for a in fired] == [
            (t0 + 10 * m, "sil2", t0 + 13 * m, "sil4")
        ]
        assert await alerts_of(api, busy) == []

        # The wall clock: a flow silent for longer than 3 s after its last success.
        clock = await new_rule(api, flow_id="f-clock", kind="no_success", minutes=0.05,
                               channels=[{"type": "slack", "url": f"{env.upstream.url}/slack"}])  # fmt: skip
        s1 = datetime.now(UTC)
        await play(env, [("clk0", "SUCCEEDED", s1, "f-clock")])

        async def fired_by_clock() -> list[dict[str, Any]]:
            return await alerts_of(api, clock)

        (alert,) = await wait_until(fired_by_clock, logs=env.log_tails)
        assert at(alert["fired_at"]) == s1 + timedelta(seconds=3) and alert["run_id"] == "clk0"
        assert alert["status"] == "open" and "no successful run of flow f-clock in 0.05 min" in alert["reason"]

        async def on_slack() -> bool:
            return any("f-clock" in b["text"] for b in bodies(env, "slack"))

        await wait_until(on_slack, logs=env.log_tails)
        # A longer limit from now on (a new revision); the next success resolves the silence.
        r = await api.patch(f"/v1/alert-rules/{clock['id']}", json={"minutes": 60})
        assert r.status_code == 200 and r.json()["minutes"] == 60
        await play(env, [("clk1", "SUCCEEDED", datetime.now(UTC), "f-clock")])
        (alert,) = await alerts_of(api, clock)
        assert alert["status"] == "resolved" and alert["resolved_by_run_id"] == "clk1"

        async def both_sent() -> bool:
            ds = (await api.get(f"/v1/alerts/{alert['id']}")).json()["deliveries"]
            return [(d["action"], d["status"]) for d in ds] == [("trigger", "delivered"), ("resolve", "delivered")]

        await wait_until(both_sent, logs=env.log_tails)


async def test_api_validates_rules_pages_history_and_keeps_tenants_apart(env: Env) -> None:
    async with env.client() as api, env.client(key="other") as other, env.client(key="reader") as reader:
        bad = [
            ({"flow_id": "f", "kind": "failed_run", "colour": "red"}, "colour"),
            ({"flow_id": "f", "kind": "failed_run", "n": 3}, "n do(es) not apply"),
            ({"flow_id": "f", "kind": "consecutive_partial"}, "needs n"),
            ({"flow_id": "f", "kind": "failure_rate", "threshold": 1.5, "window_minutes": 5}, "threshold"),
            ({"flow_id": "f", "kind": "failed_run", "channels": [{"type": "sms", "to": "x"}]}, "channels"),
            ({"flow_id": "f", "kind": "failed_run", "channels": [{"type": "email", "to": ["not-an-address"]}]}, "to"),
            ({"flow_id": "f", "kind": "failed_run", "channels": [{"type": "slack", "url": "ftp://x"}]}, "scheme"),
        ]
        for body, needle in bad:
            r = await api.post("/v1/alert-rules", json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", (body, r.text)
            assert needle in r.json()["error"]["message"], (needle, r.text)
        assert (await reader.get("/v1/alert-rules")).status_code == 403
        assert (await env.http.get(env.url("api") + "/v1/alerts")).status_code == 401

        rules = (await api.get("/v1/alert-rules")).json()["data"]
        failing = next(r for r in rules if r["flow_id"] == "f-fail")
        assert "secret" not in failing and failing["state"]["open"] is True
        assert (await api.patch(f"/v1/alert-rules/{failing['id']}", json={"kind": "no_success"})).status_code == 422
        assert (await api.patch(f"/v1/alert-rules/{failing['id']}", json={"n": 2})).status_code == 422

        # History: filters and pages.
        opened = (await api.get("/v1/alerts", params={"status": "open", "flow_id": "f-fail"})).json()["data"]
        assert [a["run_id"] for a in opened] == ["fail4"]
        seen, cursor = [], None
        while True:
            page = (await api.get("/v1/alerts", params={"limit": 2, **({"cursor": cursor} if cursor else {})})).json()
            seen += [a["id"] for a in page["data"]]
            if not (cursor := page["next_cursor"]):
                break
        everything = (await api.get("/v1/alerts", params={"limit": 200})).json()["data"]
        assert seen == [a["id"] for a in everything] and len(seen) >= 6

        # The other tenant sees nothing and can touch nothing.
        alert = opened[0]
        assert (await other.get("/v1/alert-rules")).json()["data"] == []
        assert (await other.get("/v1/alerts")).json() == {"data": [], "next_cursor": None}
        assert (await other.get(f"/v1/alerts/{alert['id']}")).status_code == 404
        for method in ("GET", "PATCH", "DELETE"):
            r = await other.request(method, f"/v1/alert-rules/{failing['id']}", json={} if method == "PATCH" else None)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, r.text)
        assert (await api.get(f"/v1/alerts/{alert['id']}")).status_code == 200

        # Deleting a rule deletes its history (a rebuild would not derive it either).
        part = next(r for r in rules if r["flow_id"] == "f-part")
        assert len(await alerts_of(api, part)) == 1
        assert (await api.delete(f"/v1/alert-rules/{part['id']}")).status_code == 204
        assert (await api.get(f"/v1/alert-rules/{part['id']}")).status_code == 404
        assert await alerts_of(api, part) == []


async def test_a_rebuild_derives_the_same_history_and_sends_nothing_again(env: Env, smtp: SmtpInbox) -> None:
    async with env.client() as api:
        before = (await api.get("/v1/alerts", params={"limit": 200})).json()["data"]
        sent = counts(env) | {"email": len(smtp.messages)}
        outcome = await rebuild.run(projector_settings(env.sandbox), swap=True, progress=lambda _: None)
        assert outcome.swapped_to is not None
        for table in ("alert_events", "alert_state"):
            live, shadow = outcome.comparison.tables[table]
            assert live == shadow and live[0] > 0, (table, live, shadow)
        assert outcome.comparison.equal, outcome.comparison.differing_tables
        assert (await api.get("/v1/alerts", params={"limit": 200})).json()["data"] == before

        # The projector follows the swap: a new failure alerts once, and only it is sent.
        await play(env, [("fail-after", "FAILED", datetime.now(UTC), "f-fail")])
        rule = next(r for r in (await api.get("/v1/alert-rules")).json()["data"] if r["flow_id"] == "f-fail")
        new = next(a for a in await alerts_of(api, rule) if a["run_id"] == "fail-after")

        async def delivered() -> bool:
            ds = (await api.get(f"/v1/alerts/{new['id']}")).json()["deliveries"]
            return len(ds) == 4 and all(d["status"] == "delivered" for d in ds)

        await wait_until(delivered, logs=env.log_tails)
    now = counts(env) | {"email": len(smtp.messages)}
    # One more message per channel (Slack's first attempt is refused, so two requests there).
    assert now == {k: v + (2 if k == "slack" else 1) for k, v in sent.items()}, (sent, now)
