"""Kafka-triggered flows, the pure part: what one message becomes — a run (its id and input), nothing (filtered
out), or a dead-letter record saying why (docs/kafka-triggers.md). No I/O; the consumers are in
`services/ingest/adapters/kafka_triggers.py`.
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from schemas import codec
from schemas.flows import TriggerConfig
from services.common.templating import TemplateError, evaluate, render, truthy

IDEMPOTENCY_HEADER = "idempotency-key"
_NS = uuid.UUID("0f5d3c1e-6a0b-4c57-9d0e-7b2a4f8e9c31")


@dataclass(frozen=True, slots=True)
class Message:
    """One record of a source topic, as the consumer fetched it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def caller(self) -> str:
        """The run's caller: where the message is, `topic/partition/offset`."""
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True)
class Run:
    run_id: str
    input: Any
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Filtered:
    why: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


Outcome = Run | Filtered | DeadLetter


def kafka_run_id(tenant_id: str, flow_id: str, message: Message, idempotency_key: str | None = None) -> str:
    """The run a message names: derived from (tenant, flow, topic, partition, offset), so reading the message again
    (a crash before the commit, a rebalance, a replay) names the same run and the executor starts it once; with an
    `Idempotency-Key` header, from (tenant, flow, key) instead, so a republished message names it too. Same shape as
    `new_run_id` (`run_` + 28 hex digits)."""
    if idempotency_key is not None:
        name = f"key\x1f{tenant_id}\x1f{flow_id}\x1f{idempotency_key}"
    else:
        name = f"offset\x1f{tenant_id}\x1f{flow_id}\x1f{message.topic}\x1f{message.partition}\x1f{message.offset}"
    return "run_" + uuid.uuid5(_NS, name).hex[:28]


def admit(message: Message, trigger: TriggerConfig, tenant_id: str, flow_id: str, *, max_value_bytes: int) -> Outcome:
    """What `message` becomes for the flow whose trigger is `trigger`: its run, Filtered, or DeadLetter."""
    size = len(message.value or b"")
    if size > max_value_bytes:
        return DeadLetter(f"oversize: the value is {size:,} bytes; the limit is {max_value_bytes:,}")
    try:
        key = None if message.key is None else message.key.decode()
    except UnicodeDecodeError as exc:
        return DeadLetter(f"undecodable key: not UTF-8 ({exc})")
    if trigger.key_pattern is not None and (key is None or _pattern(trigger.key_pattern).fullmatch(key) is None):
        return Filtered("key")
    try:
        value = _decode_value(message.value, trigger.value_format)
    except ValueError as exc:
        return DeadLetter(f"undecodable value: {exc}")
    if trigger.filter is not None:
        try:
            if not truthy(evaluate(trigger.filter, value)):
                return Filtered("filter")
        except TemplateError as exc:
            return DeadLetter(f"filter failed: {exc}")
    headers = {name: data.decode(errors="backslashreplace") for name, data in message.headers}
    idempotency_key = next((v for n, v in headers.items() if n.lower() == IDEMPOTENCY_HEADER and v), None)
    run_input: Any = value
    if trigger.input is not None:
        context = {
            "value": value, "key": key, "headers": headers, "topic": message.topic, "partition": message.partition,
            "offset": message.offset, "timestamp": iso_timestamp(message.timestamp_ms),
            "timestamp_ms": message.timestamp_ms,
        }  # fmt: skip
        try:
            run_input = render(trigger.input, context)
        except TemplateError as exc:
            return DeadLetter(f"input mapping failed: {exc}")
    return Run(kafka_run_id(tenant_id, flow_id, message, idempotency_key), run_input, idempotency_key)


def dead_letter(message: Message, reason: str, tenant_id: str, flow_id: str, flow_version: int) -> bytes:
    """The `<prefix>.dlq` record of a message no run was made of: the reason, where it came from, and its bytes
    (base64) as they were, so it can be fixed and produced again."""
    return codec.dumps({
        "reason": reason, "tenant_id": tenant_id, "flow_id": flow_id, "flow_version": flow_version,
        "source": {"topic": message.topic, "partition": message.partition, "offset": message.offset,
                   "timestamp": iso_timestamp(message.timestamp_ms)},
        "key_base64": _b64(message.key), "value_base64": _b64(message.value),
        "headers": [[name, _b64(data)] for name, data in message.headers],
    })  # fmt: skip


def iso_timestamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _decode_value(data: bytes | None, value_format: str) -> Any:
    if data is None:  # a tombstone: no value at all
        return None
    if value_format == "text":
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text ({exc})") from None
    try:
        return codec.loads(data)
    except ValueError as exc:  # orjson.JSONDecodeError
        raise ValueError(f"not JSON ({exc})") from None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


@lru_cache(maxsize=1024)
def _pattern(expression: str) -> re.Pattern[str]:
    return re.compile(expression)


def group_id(prefix: str, tenant_id: str, flow_id: str, topic: str) -> str:
    """The consumer group of one flow's subscription to one topic: its committed offsets are where the flow is."""
    return f"{prefix}.kafka-trigger.{tenant_id}.{flow_id}.{topic}"


@dataclass(frozen=True)
class KafkaTriggerLimits:
    """How much a subscription reads at once and what it lets through; ingest's settings say each
    (docs/kafka-triggers.md)."""

    batch: int = 500  # messages fetched, made into runs and appended at once per flow
    max_value_bytes: int = 512 * 1024  # a message's value past this is dead-lettered, not run
    max_executor_lag: int = 20_000  # no message is fetched while the executor has more triggers to take (0: off)
    allowed_topics: str = ".*"  # the topics a flow may read, over the whole name; Flowtrail's own never
    session_timeout_ms: int = 10_000  # how soon a dead replica's partitions go to the others
