"""What one Kafka message becomes for a kafka-triggered flow: its run (id, input), nothing, or a dead letter."""

from __future__ import annotations

import base64
import logging
from typing import Any, cast

import orjson
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from schemas.flows import STORED_FLOW, FlowDefinition, TriggerConfig
from schemas.topics import Topics
from services.common.connectors import ConnectorRegistry, KafkaCluster
from services.common.netguard import BlockedAddress
from services.common.secretstore import SecretReader
from services.ingest.adapters.kafka_triggers import KafkaTriggers
from services.ingest.kafka_triggers import DeadLetter, Filtered, Message, Run, admit, dead_letter, kafka_run_id

LIMIT = 1024


def message(value: bytes | None = b'{"id": 7, "status": "created"}', *, key: bytes | None = b"order-7",
            offset: int = 42, headers: tuple[tuple[str, bytes], ...] = ()) -> Message:  # fmt: skip
    return Message("orders", 3, offset, 1_700_000_000_123, key, value, headers)


def kafka(**fields: object) -> TriggerConfig:
    return TriggerConfig.model_validate({"type": "kafka", "topic": "orders", **fields})


def test_a_message_runs_with_its_value_as_input_and_a_run_id_derived_from_where_it_is() -> None:
    outcome = admit(message(), kafka(), "t1", "f1", max_value_bytes=LIMIT)
    assert isinstance(outcome, Run)
    assert outcome.input == {"id": 7, "status": "created"}
    assert outcome.run_id == kafka_run_id("t1", "f1", message())
    assert outcome.run_id.startswith("run_") and len(outcome.run_id) == 32
    # Read again (after a crash, a rebalance): the same run. Another offset, flow or tenant: another run.
    assert admit(message(), kafka(), "t1", "f1", max_value_bytes=LIMIT) == outcome
    others = {kafka_run_id("t1", "f1", message(offset=43)), kafka_run_id("t1", "f2", message()),
              kafka_run_id("t2", "f1", message())}  # fmt: skip
    assert outcome.run_id not in others and len(others) == 3
    assert message().caller == "orders/3/42"


def test_an_idempotency_key_header_names_the_run_wherever_the_message_was_republished() -> None:
    first = admit(message(headers=(("Idempotency-Key", b"order-7-created"),)), kafka(), "t1", "f1",
                  max_value_bytes=LIMIT)  # fmt: skip
    again = admit(message(offset=900, headers=(("idempotency-key", b"order-7-created"),)), kafka(), "t1", "f1",
                  max_value_bytes=LIMIT)  # fmt: skip
    assert isinstance(first, Run) and isinstance(again, Run)
    assert first.run_id == again.run_id and first.idempotency_key == "order-7-created"
    # Two flows reading the topic each get their own run of it.
    other_flow = admit(message(headers=(("Idempotency-Key", b"order-7-created"),)), kafka(), "t1", "f2",
                       max_value_bytes=LIMIT)  # fmt: skip
    assert isinstance(other_flow, Run) and other_flow.run_id != first.run_id


def test_key_pattern_and_filter_leave_out_messages_without_a_dead_letter() -> None:
    by_key = kafka(key_pattern=r"order-\d+")
    assert isinstance(admit(message(), by_key, "t", "f", max_value_bytes=LIMIT), Run)
    assert admit(message(key=b"refund-7"), by_key, "t", "f", max_value_bytes=LIMIT) == Filtered("key")
    assert admit(message(key=None), by_key, "t", "f", max_value_bytes=LIMIT) == Filtered("key")
    created = kafka(filter="status == 'created'")
    assert isinstance(admit(message(), created, "t", "f", max_value_bytes=LIMIT), Run)
    shipped = message(b'{"id": 7, "status": "shipped"}')
    assert admit(shipped, created, "t", "f", max_value_bytes=LIMIT) == Filtered("filter")


def test_the_input_mapping_sees_the_value_key_headers_and_coordinates() -> None:
    trigger = kafka(input={"order": "{{ value.id }}", "key": "{{ key }}", "source": "{{ headers.source }}",
                           "at": "{{ topic }}/{{ partition }}/{{ offset }}", "when": "{{ timestamp }}"})  # fmt: skip
    outcome = admit(message(headers=(("source", b"shop"),)), trigger, "t", "f", max_value_bytes=LIMIT)
    assert isinstance(outcome, Run)
    assert outcome.input == {"order": 7, "key": "order-7", "source": "shop", "at": "orders/3/42",
                             "when": "2023-11-14T22:13:20.123+00:00"}  # fmt: skip
    text = admit(message(b"plain words"), kafka(value_format="text"), "t", "f", max_value_bytes=LIMIT)
    assert isinstance(text, Run) and text.input == "plain words"


@pytest.mark.parametrize(
    ("value", "trigger", "reason"),
    [
        (b"{not json", {}, "undecodable value: not JSON"),
        (b"\xff\xfe", {"value_format": "text"}, "undecodable value: not UTF-8"),
        (b'"' + b"x" * 2000 + b'"', {}, "oversize: the value is 2,002 bytes; the limit is 1,024"),
        (b'{"n": "x"}', {"filter": "abs(n) > `1`"}, "filter failed"),
        (b'{"n": "x"}', {"input": {"n": "{{ abs(n) }}"}}, "input mapping failed"),
    ],
)
def test_a_bad_message_is_a_dead_letter_with_its_reason(value: bytes, trigger: dict[str, object], reason: str) -> None:
    outcome = admit(message(value), kafka(**trigger), "t", "f", max_value_bytes=LIMIT)
    assert isinstance(outcome, DeadLetter) and outcome.reason.startswith(reason), outcome


def test_a_dead_letter_keeps_the_reason_the_coordinates_and_the_original_bytes() -> None:
    bad = message(b"\x00\x01{bad", key=b"\xff", headers=(("trace", b"abc"),))
    record = orjson.loads(dead_letter(bad, "undecodable value: not JSON", "t1", "f1", 3))
    assert record["reason"] == "undecodable value: not JSON"
    assert (record["tenant_id"], record["flow_id"], record["flow_version"]) == ("t1", "f1", 3)
    assert record["source"] == {"topic": "orders", "partition": 3, "offset": 42,
                                "timestamp": "2023-11-14T22:13:20.123+00:00"}  # fmt: skip
    assert base64.b64decode(record["value_base64"]) == b"\x00\x01{bad"
    assert base64.b64decode(record["key_base64"]) == b"\xff"
    assert record["headers"] == [["trace", base64.b64encode(b"abc").decode()]]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"type": "kafka", "topic": "orders", "filter": "status =="}, "filter: invalid JMESPath"),
        ({"type": "kafka", "topic": "orders", "key_pattern": "(unclosed"}, "key_pattern: not a regular expression"),
        ({"type": "kafka", "topic": "orders", "input": {"a": ["{{ $.x[ }}"]}}, "input.a[0]: invalid JSONPath"),
        ({"type": "kafka", "topic": "no spaces"}, "topic: 'no spaces' is not a Kafka topic name"),
        ({"type": "api", "filter": "a"}, "filter: only a kafka trigger takes these"),
        ({"type": "schedule", "cron": "* * * * *", "connector": "c"}, "connector: only a kafka trigger takes these"),
    ],
)
def test_a_trigger_definition_that_cannot_work_is_refused_at_publish(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem.replace("[", r"\[").replace("$", r"\$")):
        TriggerConfig.model_validate(fields)
    # A version published under older rules stays readable.
    TriggerConfig.model_validate(fields, context=STORED_FLOW)


def test_a_kafka_trigger_may_name_a_connector() -> None:
    assert kafka(connector="shop-cluster").connector == "shop-cluster"
    assert kafka().connector is None  # the deployment's own cluster


# ---------------------------------------------------------------- which cluster a flow reads, and the guard


class _Pool:
    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        self.rows = rows

    async def fetchrow(self, _query: str, _tenant: str, name: str) -> dict[str, Any] | None:
        return self.rows.get(name)


class _Secrets:
    """The connectors table of one tenant, as the registry reads it (no secrets referenced, nothing encrypted)."""

    keyring = None

    def __init__(self, urls: dict[str, str]) -> None:
        self._pool = _Pool({n: {"id": f"con_{n}", "name": n, "kind": "kafka", "config": {"url": u}}
                            for n, u in urls.items()})  # fmt: skip

    async def pool(self) -> _Pool:
        return self._pool

    async def read(self, *_: Any) -> dict[str, str]:
        return {}


def _triggers(tenant_urls: dict[str, str], operator: dict[str, str] | None = None, *, allow_private: bool = False
              ) -> KafkaTriggers:  # fmt: skip
    registry = ConnectorRegistry(operator or {}, cast(SecretReader, _Secrets(tenant_urls)),
                                 setting="FLOWTRAIL_INGEST_CONNECTORS")  # fmt: skip
    return KafkaTriggers("127.0.0.1:19092", Topics("ft"), cast(Any, None), cast(Any, None), windows=cast(Any, None),
                         connectors=registry, allow_private=allow_private)  # fmt: skip


def _flow(connector: str | None) -> FlowDefinition:
    trigger = {"type": "kafka", "topic": "orders", **({"connector": connector} if connector else {})}
    step = {"name": "s", "action": "transform", "input": {}}
    return FlowDefinition.model_validate({"tenant_id": "t1", "id": "f1", "name": "F1", "version": 1,
                                          "trigger": trigger, "steps": [step]})  # fmt: skip


async def test_a_flow_reads_its_connectors_cluster_and_a_tenants_brokers_are_guarded() -> None:
    # Only IP literals: the guard decides on the address; nothing is dialled.
    tenant = {"public": "kafka://8.8.8.8:9093,1.1.1.1", "private": "kafka://10.20.30.40:9092",
              "loopback": "kafka://127.0.0.1:19092"}  # fmt: skip
    triggers = _triggers(tenant, {"ops": "kafka://10.0.0.9:9092"})
    assert await triggers.cluster(_flow(None)) == KafkaCluster("127.0.0.1:19092", guarded=False)
    # A tenant's public brokers: dialled at the checked addresses, every advertised broker checked too.
    assert await triggers.cluster(_flow("public")) == KafkaCluster("8.8.8.8:9093,1.1.1.1:9092", guarded=True)
    for name, address in (("private", "10.20.30.40"), ("loopback", "127.0.0.1")):
        with pytest.raises(BlockedAddress, match=address):
            await triggers.cluster(_flow(name))
    # The operator's connector is trusted; a deployment allowing private networks lets a tenant's through.
    assert await triggers.cluster(_flow("ops")) == KafkaCluster("10.0.0.9:9092", guarded=False)
    allowing = _triggers(tenant, allow_private=True)
    assert await allowing.cluster(_flow("private")) == KafkaCluster("10.20.30.40:9092", guarded=False)


def _unstarted(reason: str) -> float | None:
    labels = {"tenant": "t1", "flow": "f1", "topic": "orders", "reason": reason}
    return REGISTRY.get_sample_value("flowtrail_ingest_kafka_trigger_unstarted", labels)


async def test_a_connector_that_cannot_be_used_leaves_the_flow_unsubscribed_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    triggers = _triggers({"private": "kafka://10.20.30.40:9092"})
    caplog.set_level(logging.ERROR, "services.ingest.adapters.kafka_triggers")
    for _ in range(3):  # reconciled again every few seconds: logged once
        assert await triggers._subscribe(("t1", "f1"), _flow("missing"), False, cast(Any, None)) is None
    assert _unstarted("unknown_connector") == 1
    [record] = caplog.records
    assert "no kafka connector named 'missing'" in record.getMessage()
    assert "FLOWTRAIL_INGEST_CONNECTORS" in record.getMessage()
    # Another reason replaces the first; a flow no longer wanting it clears it.
    assert await triggers._subscribe(("t1", "f1"), _flow("private"), False, cast(Any, None)) is None
    assert _unstarted("blocked_address") == 1 and _unstarted("unknown_connector") is None
    refusal = caplog.records[-1].getMessage()
    assert "10.20.30.40" in refusal and "FLOWTRAIL_INGEST_ALLOW_PRIVATE_NETWORKS" in refusal
    assert len(caplog.records) == 2
    triggers._clear_unstarted(("t1", "f1"))
    assert _unstarted("blocked_address") is None
    assert triggers.subscriptions == {}
