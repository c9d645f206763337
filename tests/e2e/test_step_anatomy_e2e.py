"""Honest step anatomy on real processes and the real broker (issue 12, item 6): a run whose first step is answered
503 then 200, whose second step is skipped by its run_condition and whose last step runs, ends SUCCEEDED and shows
everything it did — each attempt's answer (the 503's body too), the skipped step's action, masked input and reason,
and an INFO log line for every step start, success and skip — and a rebuild from the ledger equals the live tables.

Time runs 100 times faster in the executor (FLOWTRAIL_EXECUTOR_TIME_SCALE=0.01): the 1 s backoff takes 10 ms.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from schemas.flows import FlowDefinition
from tests.conftest import Infra
from tests.harness import Env, answer, assert_verify_equal, first_calls, flow, running, stub_upstream

CONDITION = "steps.fetch.output.body.total > `100`"


async def _order(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["id"], "total": 40})


# The first read of an order is refused (the step's first attempt), the next one answers.
ROUTES = {
    ("GET", "/orders/{id}"): first_calls(1, answer({"error": "order service warming up"}, 503), _order),
    ("POST", "/notify"): answer({"sent": True}),
}


def _flow(upstream: str) -> FlowDefinition:
    return flow("tenant-a", "anatomy", [
        {"name": "fetch", "action": "http_request",
         "input": {"method": "GET", "url": upstream + "/orders/{{ trigger.order_id }}"}},
        {"name": "notify", "action": "http_request", "run_condition": CONDITION,
         "input": {"method": "POST", "url": upstream + "/notify",
                   "body": {"total": "{{ steps.fetch.output.body.total }}", "token": "{{ trigger.token }}"}}},
        {"name": "shape", "action": "transform", "input": {"output": {"order": "{{ steps.fetch.output.body.id }}"}}},
    ])  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    extra = {"FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01", "FLOWTRAIL_INGEST_SCHEDULER": "false"}
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, flows=[_flow(up.url)], env=extra, upstream=up
    ) as env:  # fmt: skip
        yield env


async def test_a_run_shows_every_attempts_answer_its_skipped_step_and_a_readable_log(env: Env) -> None:
    run = await env.wait_status(await env.trigger("anatomy", {"order_id": "SO-7", "token": "tok-secret-1"}), within=60)
    assert run["status"] == "SUCCEEDED", run
    assert env.upstream.statuses("/orders/SO-7") == [503, 200] and env.upstream.count("/notify") == 0
    fetch, notify, shape = run["steps"]

    # Each attempt keeps what the upstream answered: the 503's status and body, then the 200's.
    assert (fetch["status"], fetch["attempt"]) == ("SUCCEEDED", 2)
    first, second = fetch["attempts"]
    assert (first["status"], first["error"]["category"], first["error"]["status_code"]) == ("FAILED", "TRANSIENT", 503)
    assert first["output"]["status"] == 503 and first["output"]["body"] == {"error": "order service warming up"}
    assert first["output"]["request"]["url"] == env.upstream.url + "/orders/SO-7"
    assert second["status"] == "SUCCEEDED" and second["output"]["body"] == {"id": "SO-7", "total": 40}
    assert second["output"] == fetch["output"]

    # The skipped step: what it would have done (input rendered, secrets masked) and why it did not run.
    assert (notify["name"], notify["status"], notify["action"]) == ("notify", "SKIPPED", "http_request")
    assert notify["input"] == {"method": "POST", "url": env.upstream.url + "/notify",
                               "body": {"total": 40, "token": "***"}}  # fmt: skip
    assert notify["reason"] == f'run_condition "{CONDITION}" was false'
    assert notify["attempts"] == [] and notify["output"] is None
    assert shape["status"] == "SUCCEEDED" and shape["output"] == {"order": "SO-7"}

    # Its log: the executor's retry WARNING among an INFO line per step start, success and skip, in seq order.
    logs = (await env.api("GET", f"/v1/runs/{run['id']}/logs")).json()["data"]
    assert [e["seq"] for e in logs] == sorted(e["seq"] for e in logs)
    lines = [(e["level"], e["step"], e["message"]) for e in logs]
    assert lines[0] == ("INFO", "fetch", "step fetch started (http_request, attempt 1)")
    assert lines[1][:2] == ("WARNING", "fetch") and lines[1][2].startswith("attempt 1 failed (TRANSIENT)")
    assert lines[2] == ("INFO", "fetch", "step fetch started (http_request, attempt 2)")
    assert lines[3][:2] == ("INFO", "fetch") and lines[3][2].startswith("step fetch succeeded in ")
    assert lines[3][2].endswith(" ms (attempt 2)") and logs[3]["fields"]["attempt"] == 2
    assert lines[4] == ("INFO", "notify", f'step notify skipped: run_condition "{CONDITION}" was false')
    assert lines[5] == ("INFO", "shape", "step shape started (transform, attempt 1)")
    assert lines[6][:2] == ("INFO", "shape") and lines[6][2].startswith("step shape succeeded in ")
    assert len(lines) == 7
    warnings = (await env.api("GET", f"/v1/runs/{run['id']}/logs", params={"level": "WARNING"})).json()["data"]
    assert [e["level"] for e in warnings] == ["WARNING"]
    # No ledger event per log line: the ledger holds the step events only (and the executor's one WARNING).
    events = (await env.api("GET", f"/v1/runs/{run['id']}/events")).json()["data"]
    assert [e["type"] for e in events].count("LogEmitted") == 1

    # As of the retry's wait, the first attempt already shows its answer.
    waiting = next(e["seq"] for e in events if e["type"] == "StepAttemptFailed")
    then = (await env.api("GET", f"/v1/runs/{run['id']}", params={"as_of": str(waiting)})).json()
    assert then["steps"][0]["attempts"][0]["output"]["status"] == 503

    # A rebuild from the ledger equals the live read models (`flowtrail projector verify`).
    await assert_verify_equal(env.sandbox)
