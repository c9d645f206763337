"""database_query, kafka_produce, kafka_consume and python steps in runs on real processes, as the API shows them."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from schemas.flows import FlowDefinition
from tests.conftest import Infra, Sandbox
from tests.harness import Env, flow, running, steps_of, topic_records
from tests.integration.test_step_actions import PASSWORD, new_topic, with_password, write_plugin

PLUGIN = """
from services.executor.adapters.actions_python import ActionError


def score(order, context):
    return {"order": order["id"], "score": order["total"] * 2, "idempotency_key": context.idempotency_key}


def flaky(data, context):
    if context.attempt == 1:
        raise ActionError("the scoring service is warming up", category="TRANSIENT", code="warming_up")
    return {"attempt": context.attempt, "token_ok": data["api_token"] == "tok-live-123"}


async def explode(data):
    raise KeyError("sku")
"""


def _flows(dsn: str, topic: str, table: str, group: str) -> list[FlowDefinition]:
    one = "{{ steps.lookup.output.rows[0] }}"
    return [
        flow("tenant-a", "order-pipeline", [
            {"name": "lookup", "action": "database_query",
             "input": {"dsn": dsn, "query": f"SELECT id, total FROM {table} WHERE id = $1",
                       "params": ["{{ trigger.order_id }}"]},
             "assertions": [{"expression": "row_count", "expected": 1}]},
            {"name": "publish", "action": "kafka_produce",
             "input": {"topic": topic, "key": "{{ trigger.order_id }}", "value": one,
                       "headers": {"source": "order-pipeline"}}},
            {"name": "read_back", "action": "kafka_consume",
             "input": {"topic": topic, "group": group, "max_messages": 10, "timeout_s": 10},
             "extract": {"order": "messages[0].value"}},
            {"name": "score", "action": "python", "input": {"function": "score", "input": "{{ vars.order }}"}},
        ]),
        flow("tenant-a", "flaky-hook", [
            {"name": "hook", "action": "python",
             "input": {"function": "flaky", "input": {"api_token": "{{ trigger.token }}"}}},
        ]),
        flow("tenant-a", "broken-hook", [
            {"name": "hook", "action": "python", "input": {"function": "explode"}},
        ]),
        flow("tenant-a", "missing-hook", [
            {"name": "hook", "action": "python", "input": {"function": "not_installed"}},
        ]),
        flow("tenant-a", "double-insert", [
            {"name": "first", "action": "database_query",
             "input": {"connector": "shop", "query": f"INSERT INTO {table} VALUES ($1, 1)",
                       "params": ["{{ trigger.id }}"]}},
            {"name": "again", "action": "database_query",
             "input": {"connector": "shop", "query": f"INSERT INTO {table} VALUES ($1, 1)",
                       "params": ["{{ trigger.id }}"]}},
        ]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def topic(infra: Infra) -> str:
    """The topic the order pipeline produces to and consumes from."""
    return await new_topic(infra)


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory, topic: str) -> AsyncIterator[Env]:
    # The plugin is installed as pip would install it: a module and its dist-info on the executor's path.
    site = write_plugin(tmp_path_factory.mktemp("plugin") / "site", "ft-e2e-actions", "ft_e2e_actions", PLUGIN,
                        {"score": "score", "flaky": "flaky", "explode": "explode"})  # fmt: skip
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    connectors = orjson.dumps({"shop": infra.database_url}).decode()
    extra = {"PYTHONPATH": python_path, "FLOWTRAIL_EXECUTOR_CONNECTORS": connectors,
             "FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01"}  # fmt: skip
    async with running(infra, tmp_path_factory, env=extra) as env:
        table = f'"{env.sandbox.schema}".shop_orders'
        conn = await env.db()
        try:
            await conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, total numeric)")
            await conn.execute(f"INSERT INTO {table} VALUES ('SO-1', 12.5)")
        finally:
            await conn.close()
        await env.publish(_flows(with_password(infra.database_url), topic, table, f"g-{uuid.uuid4().hex[:8]}"))
        yield env


async def topic_values(infra: Infra, topic: str) -> list[bytes]:
    return [r.value for r in await topic_records(infra.kafka_bootstrap, [topic]) if r.value is not None]


async def ledger_bytes(sandbox: Sandbox) -> list[bytes]:
    """Every record of the sandbox's ledger topic, as stored."""
    return await topic_values(sandbox.infra, sandbox.topics.ledger)


async def test_a_run_queries_produces_consumes_and_calls_a_plugin(env: Env, topic: str, infra: Infra) -> None:
    run_id = await env.trigger("order-pipeline", {"order_id": "SO-1"})
    run = await env.wait_status(run_id, within=90)

    assert run["status"] == "SUCCEEDED", run
    steps = steps_of(run)
    lookup, publish, read_back, score = (steps[n] for n in ("lookup", "publish", "read_back", "score"))
    # database_query: connection masked, SQL, parameters and rows.
    assert lookup["input"]["dsn"] == with_password(infra.database_url, "***")
    assert lookup["output"]["connection"] == with_password(infra.database_url, "***")
    assert lookup["output"]["params"] == ["SO-1"] and lookup["output"]["rows"] == [{"id": "SO-1", "total": 12.5}]
    # kafka_produce: topic, key, value, partition and offset, with the attempt's idempotency key.
    assert publish["output"]["topic"] == topic and publish["output"]["key"] == "SO-1"
    assert publish["output"]["value"] == {"id": "SO-1", "total": 12.5}
    assert publish["output"]["headers"]["flowtrail-idempotency-key"] == f"{run_id}:publish:1"
    # kafka_consume: the message received, with its key, value, offset and timestamp.
    [message] = read_back["output"]["messages"]
    assert (message["key"], message["value"]) == ("SO-1", {"id": "SO-1", "total": 12.5})
    assert (message["partition"], message["offset"]) == (publish["output"]["partition"], publish["output"]["offset"])
    assert message["timestamp"] and message["headers"]["source"] == "order-pipeline"
    # python: the registered function's return value is the output.
    assert score["output"] == {"order": "SO-1", "score": 25.0, "idempotency_key": f"{run_id}:score:1"}

    # The password is nowhere: not in the API's events, not in any record of the ledger itself.
    assert PASSWORD not in orjson.dumps(await env.events(run_id)).decode()
    ledger = await ledger_bytes(env.sandbox)
    assert any(run_id.encode() in v and b"StepStarted" in v for v in ledger)
    assert not [v for v in ledger if PASSWORD.encode() in v]


async def test_a_transient_plugin_error_is_retried_and_the_run_succeeds(env: Env) -> None:
    run = await env.wait_status(await env.trigger("flaky-hook", {"token": "tok-live-123"}), within=60)
    assert run["status"] == "SUCCEEDED"
    hook = steps_of(run)["hook"]
    # The step's input is shown masked, yet the function got the real token on its retry.
    assert hook["input"] == {"function": "flaky", "input": {"api_token": "***"}}
    assert hook["output"] == {"attempt": 2, "token_ok": True}
    first, second = hook["attempts"]
    assert first["error"]["category"] == "TRANSIENT" and first["error"]["code"] == "warming_up"
    assert first["retry_at"] and second["status"] == "SUCCEEDED"


async def test_a_plugin_exception_fails_the_run_as_internal_without_retry(env: Env) -> None:
    run = await env.wait_status(await env.trigger("broken-hook", {}), within=60)
    assert run["status"] == "FAILED" and run["failed_step"] == "hook"
    hook = steps_of(run)["hook"]
    assert hook["error"]["category"] == "INTERNAL" and "KeyError: 'sku'" in hook["error"]["message"]
    assert len(hook["attempts"]) == 1


async def test_an_unregistered_function_is_a_validation_error_naming_the_registered(env: Env) -> None:
    run = await env.wait_status(await env.trigger("missing-hook", {}), within=60)
    assert run["status"] == "FAILED"
    error = steps_of(run)["hook"]["error"]
    assert error["category"] == "VALIDATION"
    assert "'not_installed' is not registered" in error["message"] and "explode, flaky, score" in error["message"]


async def test_a_duplicate_write_is_a_conflict_retried_once(env: Env) -> None:
    run = await env.wait_status(await env.trigger("double-insert", {"id": "SO-9"}), within=60)
    assert run["status"] == "FAILED" and run["failed_step"] == "again"
    steps = steps_of(run)
    assert steps["first"]["status"] == "SUCCEEDED" and steps["first"]["output"]["status"] == "INSERT 0 1"
    again = steps["again"]
    assert [a["error"]["category"] for a in again["attempts"]] == ["CONFLICT", "CONFLICT"]
    assert again["error"]["code"] == "23505" and "duplicate key" in again["error"]["message"]


async def test_triggers_waiting_for_a_starting_executor_produce_each_record_once(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Triggers handled while the executor still replays its partitions: no step runs twice, no seq is reused."""
    topic = await new_topic(infra)
    publish = {"name": "publish", "action": "kafka_produce", "input": {"topic": topic, "value": "{{ trigger.n }}"}}
    emit = flow("tenant-a", "emit", [publish])
    async with running(infra, tmp_path_factory, flows=[emit], partitions=4,
                       services=("ingest", "projector", "api")) as env:  # fmt: skip
        run_ids = [await env.trigger("emit", {"n": i}) for i in range(120)]
        executor = env.stack.add("executor", "executor")
        executor.start()
        for run_id in run_ids:
            assert (await env.wait_status(run_id, within=120))["status"] == "SUCCEEDED"
        values = [orjson.loads(v) for v in await topic_values(infra, topic)]
        assert sorted(values) == list(range(120))  # each record once
        seen: dict[tuple[str, int], set[str]] = {}
        for raw in await ledger_bytes(env.sandbox):
            event = orjson.loads(raw)
            seen.setdefault((event["run_id"], event["seq"]), set()).add(event["event_id"])
    assert all(len(ids) == 1 for ids in seen.values())
    for run_id in run_ids:
        seqs = sorted(seq for r, seq in seen if r == run_id)
        assert seqs == list(range(len(seqs)))
