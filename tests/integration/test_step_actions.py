"""Step actions on the real broker and database: database_query, kafka_produce, kafka_consume and python plugins."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.flows import mask_text
from services.executor.adapters.steps import StepCall, StepOutcome, StepRunners
from tests.conftest import Infra, Sandbox
from tests.e2e.stack import free_port

PASSWORD = "hunter2-not-shown"


def with_password(dsn: str, password: str = PASSWORD) -> str:
    """The test database trusts local logins, so any password connects; it must never be shown."""
    scheme, rest = dsn.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{password}@{host}"


def write_plugin(root: Path, dist: str, module: str, source: str, functions: dict[str, str]) -> Path:
    """An installed distribution as pip leaves it: a module plus a dist-info declaring `flowtrail.actions`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {module}:{attr}\n" for name, attr in functions.items())
    (info / "entry_points.txt").write_text(f"[flowtrail.actions]\n{lines}")
    return root


PLUGIN = """
import asyncio
from services.executor.adapters.actions_python import ActionError

def echo(data, context):
    return {"got": data, "key": context.idempotency_key, "attempt": context.attempt}

async def total(data):
    await asyncio.sleep(0)
    return {"total": sum(line["qty"] * line["price"] for line in data["lines"])}

def explode(data):
    raise ValueError("no price for sku X-1")

def throttled(data):
    raise ActionError("upstream says slow down", category="TRANSIENT", code="throttled")

def opaque(data):
    return object()
"""


@pytest.fixture
async def runners(infra: Infra, sandbox: Sandbox) -> AsyncIterator[StepRunners]:
    r = StepRunners(
        allow_private_networks=True,
        time_scale=1.0,
        max_body_bytes=64 * 1024,
        kafka_bootstrap=infra.kafka_bootstrap,
        topic_prefix=sandbox.topics.prefix,
        connectors={"main": with_password(infra.database_url), "events": f"kafka://{infra.kafka_bootstrap}"},
        max_output_bytes=64 * 1024,
        db_max_rows=50,
    )
    yield r
    await r.close()


async def run(runners: StepRunners, action: str, spec: dict[str, Any], *, attempt: int = 1, timeout_s: float = 20,
              run_id: str = "run-1", step: str = "s") -> StepOutcome:  # fmt: skip
    call = StepCall(run_id=run_id, step=step, action=action, attempt=attempt, input=spec,
                    started_at=datetime.now(UTC), timeout_s=timeout_s)  # fmt: skip
    return await runners.run(call)


async def query(runners: StepRunners, sql: str, *params: Any, **extra: Any) -> StepOutcome:
    """A database_query step on the configured `main` connector."""
    return await run(runners, "database_query", {"connector": "main", "query": sql, "params": list(params), **extra})


def failed(outcome: StepOutcome) -> tuple[str, str | None, str]:
    assert not outcome.ok and outcome.error is not None, outcome
    return outcome.error.category.value, outcome.error.code, outcome.error.message


# ---------------------------------------------------------------- database_query


@pytest.fixture
async def orders(db: asyncpg.Connection, sandbox: Sandbox) -> str:
    table = f'"{sandbox.schema}".shop_orders'
    await db.execute(f"""
        CREATE TABLE {table} (id text PRIMARY KEY, total numeric, placed_at timestamptz, ref uuid, doc jsonb,
                              raw bytea, lines int[]);
        INSERT INTO {table} VALUES
          ('SO-1', 12.50, '2024-05-01T12:00:00Z', '0b5cbd2e-6b6a-4b57-9a39-2a4f0b3f6c11', '{{"vip": true}}', '\\x0102',
           '{{1,2}}'),
          ('SO-2', 99.99, '2024-05-02T08:30:00Z', NULL, NULL, NULL, NULL);
    """)  # fmt: skip
    return table


async def test_a_query_binds_its_parameters_and_returns_json_rows(runners: StepRunners, orders: str,
                                                                  infra: Infra) -> None:  # fmt: skip
    dsn = with_password(infra.database_url)
    out = await run(runners, "database_query", {"dsn": dsn, "query": f"SELECT * FROM {orders} WHERE id = $1",
                                                "params": ["SO-1"]})  # fmt: skip
    assert out.ok, out.error
    assert out.output["rows"] == [{
        "id": "SO-1", "total": 12.5, "placed_at": "2024-05-01T12:00:00+00:00",
        "ref": "0b5cbd2e-6b6a-4b57-9a39-2a4f0b3f6c11", "doc": {"vip": True}, "raw": "\\x0102", "lines": [1, 2],
    }]  # fmt: skip
    assert out.output["columns"] == ["id", "total", "placed_at", "ref", "doc", "raw", "lines"]
    assert (out.output["row_count"], out.output["truncated"]) == (1, False)
    # Shown as a step's anatomy shows it (docs/runs.md): the connection masked, the SQL, the parameters.
    assert out.output["connection"] == mask_text(dsn) and PASSWORD not in str(out.output)
    assert out.output["query"].endswith("WHERE id = $1") and out.output["params"] == ["SO-1"]

    # A parameter is data, never SQL.
    out = await query(runners, f"SELECT id FROM {orders} WHERE id = $1", "x' OR '1'='1")
    assert out.ok and out.output["rows"] == []
    # JSON parameters are converted to the parameter's SQL type: ISO text to a timestamp, a number to numeric.
    out = await query(
        runners, f"SELECT id FROM {orders} WHERE placed_at > $1 AND total > $2", "2024-05-02T00:00:00Z", 50
    )
    assert out.ok and out.output["rows"] == [{"id": "SO-2"}], out.error


async def test_large_results_are_capped_with_a_truncation_marker(runners: StepRunners) -> None:
    out = await query(runners, "SELECT g AS n FROM generate_series(1, 100000) g")
    assert out.ok
    assert out.output["row_count"] == 50 and out.output["truncated"] is True  # the deployment's db_max_rows
    assert out.output["rows"][-1] == {"n": 50}
    out = await query(runners, "SELECT 1 AS n UNION ALL SELECT 2", max_rows=3)
    assert out.ok and out.output["truncated"] is False and out.output["row_count"] == 2
    # A byte cap too: 50 rows of 4 KiB would pass 64 KiB.
    out = await query(runners, "SELECT repeat('x', 4096) AS blob FROM generate_series(1, 50)")
    assert out.ok and out.output["truncated"] is True and 10 <= out.output["row_count"] < 16


async def test_writes_report_their_status_and_duplicates_are_conflicts(runners: StepRunners, orders: str) -> None:
    insert = f"INSERT INTO {orders} (id, total) VALUES ($1, $2)"
    out = await query(runners, insert, "SO-3", "7.25")
    assert out.ok and out.output["status"] == "INSERT 0 1" and out.output["rows"] == []
    # CONFLICT: the decider retries it once (issue 3 item 5).
    assert failed(await query(runners, insert, "SO-3", "7.25"))[:2] == ("CONFLICT", "23505")
    out = await query(runners, f"UPDATE {orders} SET total = total + $1 RETURNING id, total", 1)
    assert out.ok and sorted(r["id"] for r in out.output["rows"]) == ["SO-1", "SO-2", "SO-3"]
    assert failed(await query(runners, insert, "SO-4", 1, read_only=True))[:2] == ("VALIDATION", "25006")


async def test_a_slow_statement_is_cancelled_by_its_timeout_as_transient(runners: StepRunners) -> None:
    began = time.monotonic()
    out = await query(runners, "SELECT pg_sleep(30)", timeout_s=0.3)
    category, code, message = failed(out)
    assert (category, code) == ("TRANSIENT", "57014") and "statement timeout" in message
    assert time.monotonic() - began < 10
    # The pool's connection survived the cancel: the next query on it works.
    assert (await query(runners, "SELECT 1 AS one")).ok


async def test_bad_queries_and_inputs_are_validation_errors(runners: StepRunners, orders: str) -> None:
    category, code, _ = failed(await query(runners, "SELEC 1"))
    assert (category, code) == ("VALIDATION", "42601")
    _, code, message = failed(await query(runners, "SELECT $1::int"))
    assert code == "parameter_count" and "takes 1 parameter" in message
    _, code, message = failed(await run(runners, "database_query", {"connector": "nope", "query": "SELECT 1"}))
    assert code == "unknown_connector" and "deployment-wide: main," in message  # the kafka connector is not listed
    _, code, message = failed(await run(runners, "database_query", {"query": "SELECT 1"}))
    assert code == "invalid_input" and "exactly one of `connector`" in message
    _, code, _ = failed(await query(runners, f"SELECT * FROM {orders}", parmas=[]))
    assert code == "invalid_input"


async def test_refused_logins_and_missing_privileges_are_auth_errors(runners: StepRunners, infra: Infra, orders: str,
                                                                     db: asyncpg.Connection) -> None:  # fmt: skip
    host = infra.database_url.split("@", 1)[1]
    ghost = f"postgresql://nobody_{uuid.uuid4().hex[:8]}:{PASSWORD}@{host}"
    category, code, message = failed(await run(runners, "database_query", {"dsn": ghost, "query": "SELECT 1"}))
    assert (category, code) == ("AUTH", "28000") and PASSWORD not in message
    role = f"reader_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        dsn = f"postgresql://{role}:{PASSWORD}@{host}"
        out = await run(runners, "database_query", {"dsn": dsn, "query": f"SELECT * FROM {orders}"})
        assert failed(out)[:2] == ("AUTH", "42501")
    finally:
        await runners.db.close()  # its pool holds a connection as that role
        await db.execute(f"DROP ROLE {role}")


async def test_an_unreachable_database_is_transient(runners: StepRunners) -> None:
    dsn = f"postgresql://flowtrail:{PASSWORD}@127.0.0.1:{free_port()}/flowtrail"
    category, code, message = failed(await run(runners, "database_query", {"dsn": dsn, "query": "SELECT 1"}))
    assert (category, code) == ("TRANSIENT", "network") and PASSWORD not in message


async def test_a_dsn_in_a_flow_may_not_reach_private_networks_unless_allowed(infra: Infra) -> None:
    guarded = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=1024,
                          connectors={"main": infra.database_url})  # fmt: skip
    try:
        refused = [
            with_password(infra.database_url),
            "postgresql://u:p@10.1.2.3/db",
            "postgresql:///flowtrail?host=/var/run/postgresql",  # a local socket
            "postgresql://u:p@8.8.8.8,127.0.0.1:5432/db",  # one public host does not make the others public
            "postgresql://u:p@/flowtrail",  # no host: asyncpg would use PGHOST or a local socket
        ]
        for dsn in refused:
            outcome = await run(guarded, "database_query", {"dsn": dsn, "query": "SELECT 1"})
            assert failed(outcome)[:2] == ("VALIDATION", "blocked_address"), dsn
        # A connector is the operator's own configuration: trusted.
        assert (await run(guarded, "database_query", {"connector": "main", "query": "SELECT 1 AS one"})).ok
    finally:
        await guarded.close()


# ---------------------------------------------------------------- kafka_produce / kafka_consume


async def new_topic(infra: Infra, partitions: int = 1) -> str:
    """A topic of its own, made explicitly: the broker would auto-create one with its default partition count."""
    name = f"actions.{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=infra.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def test_a_produced_record_is_on_the_topic_with_its_idempotency_key(runners: StepRunners, infra: Infra) -> None:
    topic = await new_topic(infra)
    spec = {
        "topic": topic,
        "key": "SO-1",
        "value": {"order": "SO-1", "total": 12.5},
        "headers": {"source": "flowtrail"},
    }
    out = await run(runners, "kafka_produce", spec, run_id="r-42", step="publish")
    assert out.ok, out.error
    assert out.output["topic"] == topic and out.output["partition"] == 0 and out.output["offset"] == 0
    consumer = AIOKafkaConsumer(bootstrap_servers=infra.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, out.output["partition"])
        consumer.assign([tp])
        consumer.seek(tp, out.output["offset"])
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.key == b"SO-1" and record.value == b'{"order":"SO-1","total":12.5}'
    assert dict(record.headers) == {"source": b"flowtrail", "flowtrail-idempotency-key": b"r-42:publish:1"}
    # A text value is sent as text; the second record follows the first.
    out = await run(runners, "kafka_produce", {"topic": topic, "key": "SO-2", "value": "plain text"})
    assert out.ok and out.output["offset"] == 1


async def test_consume_reads_messages_with_key_value_offset_and_timestamp(runners: StepRunners, infra: Infra) -> None:
    topic = await new_topic(infra)
    before = datetime.now(UTC)
    for i in range(5):
        assert (await run(runners, "kafka_produce", {"topic": topic, "key": f"k{i}", "value": {"n": i}})).ok
    out = await run(runners, "kafka_consume", {"topic": topic, "max_messages": 3})
    assert out.ok, out.error
    messages = out.output["messages"]
    assert [(m["key"], m["value"], m["offset"]) for m in messages] == [("k0", {"n": 0}, 0), ("k1", {"n": 1}, 1),
                                                                       ("k2", {"n": 2}, 2)]  # fmt: skip
    assert datetime.fromisoformat(messages[0]["timestamp"]) >= before.replace(microsecond=0)
    assert messages[0]["headers"]["flowtrail-idempotency-key"] == "run-1:s:1"
    out = await run(runners, "kafka_consume", {"topic": topic, "from_offset": 3})
    assert [m["offset"] for m in out.output["messages"]] == [3, 4]  # stops at the end, no need to wait
    # Nothing new arrives: the read ends at its timeout with no messages.
    began = time.monotonic()
    out = await run(runners, "kafka_consume", {"topic": topic, "from_offset": "latest", "timeout_s": 0.5})
    assert out.ok and out.output["messages"] == [] and time.monotonic() - began < 10


async def test_a_group_continues_where_it_stopped_and_a_rerun_attempt_reads_the_same(runners: StepRunners,
                                                                                   infra: Infra) -> None:  # fmt: skip
    topic, group = await new_topic(infra, partitions=3), f"g-{uuid.uuid4().hex[:8]}"
    for i in range(5):
        assert (await run(runners, "kafka_produce", {"topic": topic, "value": i, "partition": i % 3})).ok
    spec = {"topic": topic, "group": group, "max_messages": 3, "connector": "events"}
    first = await run(runners, "kafka_consume", spec, run_id="run-a")
    assert first.ok and first.output["count"] == 3, first.error
    # The same attempt executed again (the executor crashed before recording its result) reads the same messages.
    again = await run(runners, "kafka_consume", spec, run_id="run-a")
    assert again.output["messages"] == first.output["messages"]
    # The next run continues after them: between them every message once, in offset order per partition.
    second = await run(runners, "kafka_consume", spec, run_id="run-b")
    assert second.output["count"] == 2
    both = [(m["partition"], m["offset"], m["value"]) for m in first.output["messages"] + second.output["messages"]]
    assert sorted(both) == [(0, 0, 0), (0, 1, 3), (1, 0, 1), (1, 1, 4), (2, 0, 2)]
    third = await run(runners, "kafka_consume", {**spec, "timeout_s": 0.3}, run_id="run-c")
    assert third.ok and third.output["messages"] == []


async def test_flowtrail_and_broker_topics_are_refused(runners: StepRunners, sandbox: Sandbox) -> None:
    for action, topic in (("kafka_produce", sandbox.topics.ledger), ("kafka_consume", sandbox.topics.triggers),
                          ("kafka_consume", "__consumer_offsets")):  # fmt: skip
        assert failed(await run(runners, action, {"topic": topic}))[:2] == ("VALIDATION", "reserved_topic")
    _, code, message = failed(await run(runners, "kafka_consume", {"topic": f"missing.{uuid.uuid4().hex}"}))
    assert code == "unknown_topic" and "does not exist" in message
    _, code, message = failed(await run(runners, "kafka_produce", {"topic": "t", "connector": "main"}))
    assert code == "unknown_connector" and "deployment-wide: events," in message


# ---------------------------------------------------------------- python


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"ft_it_actions_{uuid.uuid4().hex[:8]}"
    functions = {"echo": "echo", "total": "total", "explode": "explode", "throttled": "throttled", "opaque": "opaque"}
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path / "site", "ft-it-actions", module, PLUGIN, functions)))


@pytest.mark.usefixtures("plugin")
async def test_registered_functions_run_sync_or_async_with_their_input(runners: StepRunners) -> None:
    out = await run(runners, "python", {"function": "echo", "input": {"a": 1}}, attempt=2, run_id="r-7", step="hook")
    assert out.ok and out.output == {"got": {"a": 1}, "key": "r-7:hook:2", "attempt": 2}
    lines = [{"qty": 2, "price": 1.5}, {"qty": 1, "price": 4}]
    out = await run(runners, "python", {"function": "total", "input": {"lines": lines}})
    assert out.ok and out.output == {"total": 7.0}


@pytest.mark.usefixtures("plugin")
async def test_python_failures_are_classified(runners: StepRunners) -> None:
    category, code, message = failed(await run(runners, "python", {"function": "explode", "input": {}}))
    assert (category, code) == ("INTERNAL", "function_raised") and "ValueError: no price for sku X-1" in message
    assert failed(await run(runners, "python", {"function": "throttled"}))[:2] == ("TRANSIENT", "throttled")
    assert failed(await run(runners, "python", {"function": "opaque"}))[:2] == ("INTERNAL", "output_not_json")
    category, code, message = failed(await run(runners, "python", {"function": "nope"}))
    assert (category, code) == ("VALIDATION", "unknown_function")
    assert "registered: echo, explode, opaque, throttled, total" in message
