"""`kafka_produce` and `kafka_consume`: one record out with its partition and offset; a bounded read of messages."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka import errors as kerr
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from schemas.events import ErrorCategory
from schemas.flows import KafkaConsumeInput, KafkaProduceInput
from services.common import kafka
from services.common.connectors import kafka_cluster
from services.common.failures import classify_kafka, masked_message
from services.common.netguard import BlockedAddress, KafkaGuard, UnresolvableHost
from services.executor.adapters.actions_base import (
    StepCall,
    StepError,
    b64,
    json_size,
    parse_input,
)
from services.executor.adapters.connectors import ConnectorRegistry, as_registry

T = TypeVar("T")
IDEMPOTENCY_HEADER = "flowtrail-idempotency-key"


class KafkaActions:
    """One idempotent producer per cluster, shared by every step; a short-lived consumer per `kafka_consume`."""

    def __init__(self, *, bootstrap: str, reserved_prefix: str, connectors: ConnectorRegistry | Mapping[str, str],
                 max_output_bytes: int, allow_private: bool = False) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.allow_private = allow_private
        self._guarded: set[str] = set()  # bootstrap strings of tenant connectors: their clients check every broker
        # Flowtrail's own topics (and the broker's): a flow may neither forge ledger events nor read other tenants'.
        self.reserved = (f"{reserved_prefix}.", f"{reserved_prefix}-", "__")
        self.connectors = as_registry(connectors)
        self.max_bytes = max_output_bytes
        self._producers: dict[str, AIOKafkaProducer] = {}
        self._admins: dict[str, AIOKafkaAdminClient] = {}
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        producers, self._producers = list(self._producers.values()), {}
        admins, self._admins = list(self._admins.values()), {}
        for producer in producers:
            await producer.stop()
        for admin in admins:
            await admin.close()

    async def _cluster(self, call: StepCall, connector: str | None, topic: str) -> str:
        """The bootstrap servers to use. A tenant's own connector is guarded like a flow's URL: its bootstrap servers
        resolved once and checked (the client dials the checked addresses) and every broker the cluster advertises
        checked before it is dialled (`_guarded` clients); the operator's connectors and cluster are trusted."""
        if connector is None:
            servers = self.bootstrap
        else:
            resolved = await self.connectors.resolve(call.tenant_id, call.environment, connector, ("kafka",), "kafka")
            try:
                cluster = await kafka_cluster(resolved, allow_private=self.allow_private)
            except BlockedAddress as exc:
                raise StepError(ErrorCategory.VALIDATION, str(exc), code="blocked_address") from exc
            except UnresolvableHost as exc:
                raise StepError(ErrorCategory.TRANSIENT, str(exc), code="unresolvable_host") from exc
            servers = cluster.servers
            if cluster.guarded:
                self._guarded.add(servers)
        if servers == self.bootstrap and (topic.startswith(self.reserved) or topic == self.reserved[0][:-1]):
            raise StepError(ErrorCategory.VALIDATION, f"topic {topic!r} belongs to Flowtrail or the broker; "
                            "flows may not read or write it", code="reserved_topic")  # fmt: skip
        return servers

    def _guard(self, servers: str, client: Any) -> None:
        if servers in self._guarded:
            KafkaGuard().install(client)

    async def _producer(self, servers: str) -> AIOKafkaProducer:
        async with self._lock:
            producer = self._producers.get(servers)
            if producer is None:
                producer = kafka.producer(servers, linger_ms=2, client_id="flowtrail-executor-steps")
                self._guard(servers, producer.client)
                await producer.start()
                self._producers[servers] = producer
            return producer

    async def _admin(self, servers: str) -> AIOKafkaAdminClient:
        async with self._lock:
            admin = self._admins.get(servers)
            if admin is None:
                admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id="flowtrail-executor-steps")
                self._guard(servers, admin._client)
                await admin.start()
                self._admins[servers] = admin
            return admin

    # ------------------------------------------------------------------ produce

    async def produce(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(KafkaProduceInput, call.input, "kafka_produce")
        servers = await self._cluster(call, spec.connector, spec.topic)
        # The attempt's idempotency key rides along, so a record sent again after a crash is recognisable.
        headers = {**{str(k): _text(v) for k, v in spec.headers.items()}, IDEMPOTENCY_HEADER: call.idempotency_key}
        key, value = _encode(spec.key), _encode(spec.value)
        shown = {"topic": spec.topic, "key": spec.key, "value": spec.value, "headers": headers}
        try:
            producer = await self._producer(servers)
            sent = await producer.send_and_wait(spec.topic, value, key=key, partition=spec.partition,
                                                headers=[(k, v.encode()) for k, v in headers.items()])  # fmt: skip
        except (kerr.KafkaError, OSError) as exc:
            raise StepError(classify_kafka(exc), masked_message(exc), code="kafka", output=shown) from exc
        return {**shown, "partition": sent.partition, "offset": sent.offset, "timestamp": _iso(sent.timestamp)}

    # ------------------------------------------------------------------ consume

    async def consume(self, call: StepCall) -> dict[str, Any]:
        spec = parse_input(KafkaConsumeInput, call.input, "kafka_consume")
        servers = await self._cluster(call, spec.connector, spec.topic)
        # Return what was read before the step's own timeout would throw it away.
        wait_s = min(spec.timeout_s, call.timeout_s * 0.8)
        consumer = AIOKafkaConsumer(bootstrap_servers=servers, group_id=spec.group, enable_auto_commit=False,
                                    client_id="flowtrail-executor-steps", auto_offset_reset="earliest")  # fmt: skip
        self._guard(servers, consumer._client)
        try:
            await consumer.start()
            try:
                return await self._read(consumer, servers, spec, wait_s, call.idempotency_key)
            finally:
                await consumer.stop()
        except StepError:
            raise
        except (kerr.KafkaError, OSError) as exc:
            raise StepError(classify_kafka(exc), masked_message(exc), code="kafka",
                            output={"topic": spec.topic, "group": spec.group}) from exc  # fmt: skip

    async def _read(self, consumer: AIOKafkaConsumer, servers: str, spec: KafkaConsumeInput, wait_s: float,
                    idempotency_key: str) -> dict[str, Any]:  # fmt: skip
        admin = await self._admin(servers)
        # Listing all topics, not describing this one: a describe would auto-create a missing topic.
        if spec.topic not in await admin.list_topics():
            raise StepError(ErrorCategory.VALIDATION, f"topic {spec.topic!r} does not exist", code="unknown_topic")
        [described] = await admin.describe_topics([spec.topic])
        partitions = sorted(p["partition"] for p in described["partitions"])
        if spec.partition is not None:
            if spec.partition not in partitions:
                raise StepError(ErrorCategory.VALIDATION, f"topic {spec.topic!r} has partitions {partitions}, "
                                f"not {spec.partition}", code="unknown_partition")  # fmt: skip
            partitions = [spec.partition]
        tps = [TopicPartition(spec.topic, p) for p in partitions]
        # Manual assignment: no group join and rebalance wait; the group only keeps the position.
        consumer.assign(tps)
        starts, stops = await self._seek(consumer, servers, spec, tps, idempotency_key)
        # Read up to what was there when the step began; a re-run of an attempt reads exactly what it read before.
        ends = {**await consumer.end_offsets(tps), **stops}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        read: list[ConsumerRecord[bytes, bytes]] = []
        while len(read) < spec.max_messages and (left := deadline - loop.time()) > 0:
            # Stop once something was read (or this is a re-run) and everything up to the ends has been read too.
            if (read or len(stops) == len(tps)) and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
            batch = await consumer.getmany(*tps, timeout_ms=int(min(left, 0.5) * 1000),
                                           max_records=spec.max_messages - len(read))  # fmt: skip
            for tp, records in batch.items():
                read += [r for r in records if tp not in stops or r.offset < stops[tp]]
        read.sort(key=lambda r: (r.partition, r.offset))
        messages, size, truncated = [], 0, False
        for record in read:
            message = _message(record)
            size += json_size(message)
            if size > self.max_bytes:
                truncated = True  # the rest stays uncommitted: the group reads it next time
                break
            messages.append(message)
        if spec.group is not None:
            # Every partition, read or not, marked with this attempt's key and start: a re-run can repeat it.
            upto = {tp.partition: starts[tp.partition] for tp in tps}
            for m in messages:
                upto[m["partition"]] = m["offset"] + 1
            marks = {p: OffsetAndMetadata(o, _mark(idempotency_key, starts[p])) for p, o in upto.items()}
            offsets = {TopicPartition(spec.topic, p): mark for p, mark in marks.items()}
            await _coordinated(lambda: consumer.commit(offsets))
        return {"topic": spec.topic, "group": spec.group, "partitions": partitions, "messages": messages,
                "count": len(messages), "truncated": truncated}  # fmt: skip

    async def _seek(
        self, consumer: AIOKafkaConsumer, servers: str, spec: KafkaConsumeInput, tps: list[TopicPartition], key: str
    ) -> tuple[dict[int, int], dict[TopicPartition, int]]:
        """Position each partition: where reading starts by partition, and where a re-run of this attempt stops."""
        committed: dict[TopicPartition, OffsetAndMetadata] = {}
        stops: dict[TopicPartition, int] = {}
        if spec.group is not None:
            admin = await self._admin(servers)
            committed = await _coordinated(lambda: admin.list_consumer_group_offsets(spec.group, partitions=tps))
        for tp in tps:
            mark = committed.get(tp)
            redo = _start_of(mark.metadata, key) if mark else None
            if mark is not None and redo is not None:
                # The same attempt ran before (a crash after its commit): read the same messages again.
                consumer.seek(tp, redo)
                stops[tp] = mark.offset
            elif mark is not None and mark.offset >= 0:
                consumer.seek(tp, mark.offset)
            elif spec.from_offset == "earliest":
                await consumer.seek_to_beginning(tp)
            elif spec.from_offset == "latest":
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, int(spec.from_offset))
        return {tp.partition: await consumer.position(tp) for tp in tps}, stops


_COORDINATOR_STARTING = (kerr.GroupCoordinatorNotAvailableError, kerr.CoordinatorLoadInProgressError,
                         kerr.NotCoordinatorForGroupError)  # fmt: skip


async def _coordinated(request: Callable[[], Awaitable[T]], *, within_s: float = 10.0) -> T:
    """A group request, asked again while the broker is still electing the group's coordinator.

    A broker creates `__consumer_offsets` when the first group asks for it, and answers "not available" until
    its partitions have leaders: a second or two on a fresh cluster, not a reason to fail the step.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    delay = 0.05
    while True:
        try:
            return await request()
        except _COORDINATOR_STARTING:
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _mark(idempotency_key: str, start: int) -> str:
    return orjson.dumps({"flowtrail": idempotency_key, "from": start}).decode()


def _start_of(metadata: str | None, idempotency_key: str) -> int | None:
    try:
        mark = orjson.loads(metadata or "")
    except orjson.JSONDecodeError:
        return None
    if isinstance(mark, dict) and mark.get("flowtrail") == idempotency_key and isinstance(mark.get("from"), int):
        return int(mark["from"])
    return None


def _encode(value: Any) -> bytes | None:
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _decode(raw: bytes | None) -> Any:
    """JSON when the bytes are JSON, else text, else `{"base64": …}`."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return {"base64": b64(raw)}


def _header(raw: bytes) -> Any:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return {"base64": b64(raw)}


def _message(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    return {
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": _iso(record.timestamp),
        "key": _decode(record.key),
        "value": _decode(record.value),
        "headers": {k: _header(v) for k, v in record.headers},
    }


def _iso(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    return dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
