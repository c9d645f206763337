"""Kafka-triggered flows on the real broker (docs/kafka-triggers.md): messages an independent producer writes to a
topic become exactly one run each, through an ingest killed with -9 mid-stream; a poison message is dead-lettered
while its neighbours run; a paused flow consumes nothing and resumes where it stopped; two flows on one topic each
get every message; the lag shows in /metrics; a flow reads its topic on a tenant connector's cluster (a second,
private broker), and a flow naming an unknown connector leaves the others alone.

The stream test produces FLOWTRAIL_KAFKA_TRIGGER_E2E_MESSAGES messages, 10,000 (the issue's figure) unless set; a
smaller number (`=2000`) is the smoke variant for a loaded machine.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.launcher.kafka import ensure_kafka, kafka_jar_dir, stop_kafka
from deploy.launcher.status import consumer_lag, render_status
from services.common.settings import CommonSettings
from services.ingest.kafka_triggers import Message, kafka_run_id
from tests.conftest import Infra
from tests.e2e.stack import free_port
from tests.harness import Env, flow, running, topic_records, wait_until

MESSAGES = int(os.environ.get("FLOWTRAIL_KAFKA_TRIGGER_E2E_MESSAGES", "10000"))
TENANT = "tenant-a"
STEP = [{"name": "echo", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}]
SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}


async def test_every_message_becomes_exactly_one_run_through_an_ingest_killed_mid_stream(env: Env, src: Topics) -> None:
    produced: list[tuple[int, int]] = []

    async def produce() -> None:
        async with _producer(env) as producer:
            for start in range(0, MESSAGES, 250):
                sent = [await producer.send(src.stream, orjson.dumps({"n": i}), key=str(i).encode())
                        for i in range(start, min(MESSAGES, start + 250))]  # fmt: skip
                produced.extend((m.partition, m.offset) for m in await asyncio.gather(*sent))
                await asyncio.sleep(0.25)

    producing = asyncio.create_task(produce())
    # Mid-stream: ingest has made runs of some messages and the producer is still writing.
    await wait_until(lambda: _made_runs(env, "stream", at_least=MESSAGES // 5), 120, "ingest made runs",
                     logs=env.log_tails)  # fmt: skip
    assert not producing.done(), "the producer finished before the kill: the kill was not mid-stream"
    env.stack["ingest"].kill()
    await asyncio.sleep(1)
    env.stack["ingest"].start()
    await env.stack["ingest"].wait_healthy()
    await producing
    assert len(produced) == MESSAGES
    db = await env.db()
    try:
        await wait_until(lambda: _count(db, "stream", "status = 'SUCCEEDED'", MESSAGES), 600,
                         f"{MESSAGES} runs succeeded", logs=env.log_tails)  # fmt: skip
        rows = await db.fetch("SELECT id, trigger_type, caller FROM runs WHERE flow_id = 'stream'")
        started = await db.fetchval(
            "SELECT count(*) FROM run_events e JOIN runs r ON r.id = e.run_id "
            "WHERE r.flow_id = 'stream' AND e.type = 'RunRequested'"
        )
    finally:
        await db.close()
    # Exactly the runs the messages name: one per (partition, offset), none twice, each started once.
    expected = {kafka_run_id(TENANT, "stream", _at(src.stream, p, o)): f"{src.stream}/{p}/{o}" for p, o in produced}
    assert len(rows) == MESSAGES and started == MESSAGES
    assert {r["id"]: r["caller"] for r in rows} == expected
    assert {r["trigger_type"] for r in rows} == {"kafka"}
    # Some messages were read twice (before the kill, not yet committed): the triggers topic shows it, the runs not.
    appended = [r for r in await topic_records(env.infra.kafka_bootstrap, [env.sandbox.topics.triggers])
                if b'"flow_id":"stream"' in r.value]  # fmt: skip
    assert len({orjson.loads(r.value)["run_id"] for r in appended}) == MESSAGES <= len(appended)
    # The lag of the flow's topic shows in /metrics, back to 0 once every message is a run.
    assert await _metric(env, "flowtrail_ingest_kafka_trigger_lag", flow="stream") == 0


async def test_a_poison_message_is_dead_lettered_while_its_neighbours_run(env: Env, src: Topics) -> None:
    values = [b'{"n": 1}', b"\xff\xfe not json", b'{"n": 3}', b'{"n": "three"}', b'{"n": 5}']
    async with _producer(env) as producer:
        offsets = [(m.partition, m.offset) for m in [await producer.send_and_wait(src.checked, v) for v in values]]
    ids = [kafka_run_id(TENANT, "checked", _at(src.checked, p, o)) for p, o in offsets]
    finals = {i: await env.wait_status(ids[i], within=60) for i in (0, 2, 3, 4)}
    assert [finals[i]["status"] for i in (0, 2, 4)] == ["SUCCEEDED"] * 3
    # An input-schema violation is an INVALID run, as over HTTP.
    assert finals[3]["status"] == "INVALID"
    run = finals[0]
    assert run["trigger"]["type"] == "kafka" and run["trigger"]["caller"] == f"{src.checked}/{offsets[0][0]}/0"
    assert run["trigger"]["payload"] == {"n": 1}
    # The undecodable one is no run: it is in the dead-letter topic with its reason, place and bytes.
    assert await env.run(ids[1]) is None
    dead = [orjson.loads(r.value) for r in await topic_records(env.infra.kafka_bootstrap, [env.sandbox.topics.dlq])]
    mine = [d for d in dead if d.get("flow_id") == "checked"]
    assert len(mine) == 1, dead
    assert mine[0]["reason"].startswith("undecodable value: not JSON")
    assert mine[0]["source"]["topic"] == src.checked and mine[0]["source"]["offset"] == offsets[1][1]
    assert base64.b64decode(mine[0]["value_base64"]) == values[1]
    # Filterable by trigger type.
    page = await env.ok("GET", "/v1/runs", params={"trigger_type": "kafka", "flow_id": "checked"})
    assert sorted(r["id"] for r in page["data"]) == sorted(ids[i] for i in (0, 2, 3, 4))
    assert await _metric(env, "flowtrail_ingest_kafka_trigger_messages_total", flow="checked",
                         outcome="dead_lettered") == 1  # fmt: skip


async def test_a_paused_flow_consumes_nothing_and_resumes_where_it_stopped(env: Env, src: Topics) -> None:
    # All on one partition: the other has had no message before the pause, and its waiting ones must count too.
    await _produce(env, src.pausable, range(5), partition=1)
    await wait_until(lambda: _made(env, "pausable", 5), 60, "5 runs before the pause", logs=env.log_tails)
    await env.ok("POST", "/v1/flows/pausable/pause", json={"reason": "maintenance"})
    await wait_until(lambda: _is(env, "flowtrail_ingest_kafka_trigger_paused", 1, flow="pausable"), 30, "paused")
    await _produce(env, src.pausable, range(5, 25))
    # The 20 messages wait, and /metrics says so.
    await wait_until(lambda: _is(env, "flowtrail_ingest_kafka_trigger_lag", 20, flow="pausable"), 30, "lag of 20")
    await asyncio.sleep(2)
    assert await _made(env, "pausable", 0) == 5
    # `flowtrail status` shows the flow's group 20 messages behind on its topic.
    settings = CommonSettings(kafka_bootstrap=env.infra.kafka_bootstrap, database_url=env.infra.database_url,
                              database_schema=env.sandbox.schema, topic_prefix=env.sandbox.topics.prefix)  # fmt: skip
    lag = (await consumer_lag(settings))[f"kafka trigger {TENANT}.pausable.{src.pausable}"]
    assert (lag["topic"], lag["total_lag"]) == (src.pausable, 20), lag
    assert f"{src.pausable}: total 20" in render_status({"state_dir": "-", "components": {}, "supervisor_pid": None,
                                  "api_key_present": False, "consumer_lag": {"pausable": lag}})  # fmt: skip
    await env.ok("POST", "/v1/flows/pausable/resume")
    await wait_until(lambda: _made(env, "pausable", 25), 60, "the 20 after the resume", logs=env.log_tails)
    await wait_until(lambda: _is(env, "flowtrail_ingest_kafka_trigger_lag", 0, flow="pausable"), 30, "lag of 0")
    db = await env.db()
    try:
        inputs = await db.fetchval(
            "SELECT array_agg((trigger_payload->>'n')::int) FROM runs WHERE flow_id = 'pausable'"
        )
    finally:
        await db.close()
    assert sorted(inputs) == list(range(25))


async def test_two_flows_on_one_topic_each_get_every_message(env: Env, src: Topics) -> None:
    await _produce(env, src.shared, range(50))
    for flow_id in ("fan-a", "fan-b"):
        await wait_until(functools.partial(_made, env, flow_id, 50), 60, f"50 runs of {flow_id}", logs=env.log_tails)
    db = await env.db()
    try:
        rows = await db.fetch("SELECT flow_id, caller, id FROM runs WHERE flow_id IN ('fan-a', 'fan-b')")
    finally:
        await db.close()
    callers = {f: sorted(r["caller"] for r in rows if r["flow_id"] == f) for f in ("fan-a", "fan-b")}
    assert callers["fan-a"] == callers["fan-b"] and len(set(callers["fan-a"])) == 50
    assert len({r["id"] for r in rows}) == 100  # each flow its own run of each message


async def test_a_flow_reads_its_topic_on_a_tenant_connectors_cluster(env: Env, private_kafka: str) -> None:
    topic = f"{env.sandbox.topics.prefix}-src-{uuid.uuid4().hex[:6]}.elsewhere"
    admin = AIOKafkaAdminClient(bootstrap_servers=private_kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    connector = {"name": "elsewhere", "kind": "kafka", "config": {"url": f"kafka://{private_kafka}"}}
    await env.ok("POST", "/v1/connectors", status=201, json=connector)
    await env.publish([flow(TENANT, "remote", STEP, trigger={"type": "kafka", "topic": topic,
                                                              "connector": "elsewhere"})])  # fmt: skip
    async with AIOKafkaProducer(bootstrap_servers=private_kafka, acks="all") as producer:
        sent = [await producer.send(topic, orjson.dumps({"n": n})) for n in range(30)]
        produced = [(m.partition, m.offset) for m in await asyncio.gather(*sent)]
    await wait_until(lambda: _made(env, "remote", 30), 60, "30 runs from the private broker", logs=env.log_tails)
    await asyncio.sleep(1)  # none more comes
    db = await env.db()
    try:
        rows = await db.fetch("SELECT id, caller, (trigger_payload->>'n')::int AS n FROM runs WHERE flow_id = 'remote'")
    finally:
        await db.close()
    # Exactly one run per message of the private broker, named by where it is there.
    assert {r["id"]: r["caller"] for r in rows} == {
        kafka_run_id(TENANT, "remote", _at(topic, p, o)): f"{topic}/{p}/{o}" for p, o in produced
    }
    assert sorted(r["n"] for r in rows) == list(range(30))


async def test_a_flow_naming_an_unknown_connector_leaves_the_others_alone(env: Env, src: Topics) -> None:
    topic = f"{src.shared}-local"
    admin = AIOKafkaAdminClient(bootstrap_servers=env.infra.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    trigger = {"type": "kafka", "topic": topic}
    await env.publish([flow(TENANT, "lost", STEP, trigger={**trigger, "connector": "nowhere"}),
                       flow(TENANT, "local", STEP, trigger=trigger)])  # fmt: skip
    # The unknown connector is said in /metrics, and its flow does not fall back to the deployment's cluster.
    await wait_until(lambda: _is(env, "flowtrail_ingest_kafka_trigger_unstarted", 1, flow="lost",
                                 reason="unknown_connector"), 30, "the unknown connector in /metrics")  # fmt: skip
    await _produce(env, topic, range(10))
    await wait_until(lambda: _made(env, "local", 10), 60, "10 runs of the flow beside it", logs=env.log_tails)
    await asyncio.sleep(1)
    assert await _made(env, "local", 0) == 10
    assert await _made(env, "lost", 0) == 0
    assert await _is(env, "flowtrail_ingest_kafka_trigger_unstarted", 1, flow="lost", reason="unknown_connector")


# ---------------------------------------------------------------- the environment


@dataclass(frozen=True)
class Topics:
    """The source topics, one per test (the producers' topics: outside Flowtrail's prefix)."""

    stream: str
    checked: str
    pausable: str
    shared: str


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    # The broker's minimum session timeout: the killed ingest's partitions move on sooner.
    # Connectors on loopback: the private broker of the connector test.
    async with running(infra, tmp_path_factory, keys={"a": TENANT}, partitions=4, flows=[flow(TENANT, "http", STEP)],
                       env={"FLOWTRAIL_INGEST_KAFKA_TRIGGER_SESSION_TIMEOUT_MS": "6000",
                            "FLOWTRAIL_INGEST_ALLOW_PRIVATE_NETWORKS": "true",
                            "FLOWTRAIL_API_CONNECTOR_ALLOW_PRIVATE_NETWORKS": "true"}) as env:  # fmt: skip
        # The stack runs runs before any message is produced (a broker slow to show new topics can leave the
        # executor without its partitions for minutes: that is not what these tests measure).
        await env.wait_status(await env.trigger("http", {"n": 0}), ["SUCCEEDED"], within=180)
        yield env


@pytest.fixture(scope="module")
async def src(env: Env) -> AsyncIterator[Topics]:
    base = f"{env.sandbox.topics.prefix}-src-{uuid.uuid4().hex[:6]}"
    topics = Topics(f"{base}.stream", f"{base}.checked", f"{base}.pausable", f"{base}.shared")
    admin = AIOKafkaAdminClient(bootstrap_servers=env.infra.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 4 if t == topics.stream else 2, 1) for t in vars(topics).values()])
    finally:
        await admin.close()

    def kafka(flow_id: str, topic: str, **fields: Any) -> Any:
        return flow(TENANT, flow_id, STEP, trigger={"type": "kafka", "topic": topic}, **fields)

    # Published while ingest runs: its subscriptions follow the flows topic.
    await env.publish([
        kafka("stream", topics.stream), kafka("checked", topics.checked, input_schema=SCHEMA),
        kafka("pausable", topics.pausable), kafka("fan-a", topics.shared), kafka("fan-b", topics.shared),
    ])  # fmt: skip
    yield topics


@pytest.fixture(scope="module")
def private_kafka(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second broker, on loopback ports and a state folder of its own (the shared one's jars): a tenant's cluster.
    Only it is stopped afterwards."""
    state = tmp_path_factory.mktemp("private-kafka")
    (state / "cache").mkdir()
    os.symlink(kafka_jar_dir(infra.state_dir), kafka_jar_dir(state))
    broker = ensure_kafka(state, port=free_port(), controller_port=free_port(), num_partitions=2, timeout=90)
    try:
        yield broker.bootstrap
    finally:
        stop_kafka(Path(state), timeout=20)
        broker.stop(timeout=5)


def _producer(env: Env) -> AIOKafkaProducer:
    """An independent producer, as an upstream system's: acks=all, its own client."""
    return AIOKafkaProducer(bootstrap_servers=env.infra.kafka_bootstrap, acks="all", linger_ms=5)


async def _produce(env: Env, topic: str, numbers: range, partition: int | None = None) -> None:
    async with _producer(env) as producer:
        sent = [await producer.send(topic, orjson.dumps({"n": n}), partition=partition) for n in numbers]
        await asyncio.gather(*sent)


def _at(topic: str, partition: int, offset: int) -> Message:
    return Message(topic, partition, offset, 0, None, None)


async def _count(db: Any, flow_id: str, where: str, at_least: int) -> bool:
    return bool(await db.fetchval(f"SELECT count(*) FROM runs WHERE flow_id = $1 AND {where}", flow_id) >= at_least)


async def _made(env: Env, flow_id: str, at_least: int) -> int:
    """The flow's runs in the read model when there are at least `at_least` (0 otherwise)."""
    db = await env.db()
    try:
        count = int(await db.fetchval("SELECT count(*) FROM runs WHERE flow_id = $1", flow_id))
    finally:
        await db.close()
    return count if count >= at_least else 0


async def _made_runs(env: Env, flow_id: str, at_least: int) -> bool:
    made = await _metric(env, "flowtrail_ingest_kafka_trigger_messages_total", flow=flow_id, outcome="run")
    return made is not None and made >= at_least


async def _metric(env: Env, name: str, **labels: str) -> float | None:
    """The sum of `name`'s samples with `labels` in ingest's /metrics; None when there is none."""
    r = await env.http.get(env.url("ingest") + "/metrics")
    values = []
    for line in r.text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            values.append(float(match.group(2)))
    return sum(values) if values else None


async def _is(env: Env, name: str, value: float, **labels: str) -> bool:
    return await _metric(env, name, **labels) == value
