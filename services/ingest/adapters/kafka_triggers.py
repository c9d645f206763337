"""Kafka-triggered flows, the consumers: one consumer group per (tenant, flow, topic), following flow publishes,
pauses and resumes on the flows topic without a restart (docs/kafka-triggers.md; the choice: docs/decisions.md).

A subscription fetches at most `batch` messages, makes each a run (services/ingest/kafka_triggers.py), appends
their triggers (and the dead-letter records of bad ones) until every one is durable, and only then commits the
offsets after them. A crash before the commit reads the messages again, and they name the same runs, which the
executor starts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from schemas import codec
from schemas.events import (
    CursorWindow,
    ExecutionMode,
    FlowEventBase,
    FlowResumed,
    FlowVersionPublished,
    TriggerInfo,
    TriggerReceived,
    TriggerType,
)
from schemas.flows import FlowDefinition, StepAction, mask_text
from schemas.topics import Topics
from services.common.appender import Appender, AppendFailed
from services.common.connectors import ConnectorRegistry, KafkaCluster, kafka_cluster
from services.common.failures import StepError
from services.common.flowfollow import FlowFollower, FlowKey, cancelled
from services.common.netguard import ALLOW_HINT, BlockedAddress, KafkaGuard, UnresolvableHost
from services.common.triggerlog import TriggerLog
from services.ingest import metrics
from services.ingest.adapters.backlog import Backlog
from services.ingest.kafka_triggers import (
    DeadLetter,
    Filtered,
    KafkaTriggerLimits,
    Message,
    Run,
    admit,
    dead_letter,
    group_id,
)

log = logging.getLogger(__name__)

Windows = Callable[[str, str, int], Awaitable[CursorWindow | None]]
_INGEST_ALLOW_HINT = "set FLOWTRAIL_INGEST_ALLOW_PRIVATE_NETWORKS=true to allow it"


class Subscription:
    """One flow reading one topic in its own consumer group; every ingest replica runs one, sharing partitions. The
    topic is on `cluster`: the deployment's own, or the cluster of the kafka connector the trigger names."""

    def __init__(
        self, owner: KafkaTriggers, flow: FlowDefinition, paused: bool, since: datetime, cluster: KafkaCluster
    ) -> None:
        assert flow.trigger.topic is not None
        self.owner = owner
        self.cluster = cluster
        self.connector = flow.trigger.connector  # another connector in a newer version: another subscription
        self.flow = flow  # a newer version on the same topic replaces it: its filter and mapping apply from then on
        self.topic = flow.trigger.topic
        self.since = since  # when the flow first read this topic: `start_from: published` starts there
        self.labels = (flow.tenant_id, flow.id, self.topic)
        self.group = group_id(owner.topics.prefix, flow.tenant_id, flow.id, self.topic)
        self.paused = paused
        self._active = asyncio.Event()
        self._skip_to_newest = False
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        if not paused:
            self._active.set()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.cluster.servers, group_id=self.group, client_id=f"flowtrail-ingest-{self.flow.id}",
            enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
            max_poll_records=self.owner.limits.batch, session_timeout_ms=self.owner.limits.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.owner.limits.session_timeout_ms // 3),
            # A topic created after the flow was published is found within seconds, not metadata.max.age's 5 min.
            metadata_max_age_ms=3000,
        )  # fmt: skip
        consumer.subscribe([self.topic], listener=_Placement(self))
        # A tenant's connector: every broker its cluster advertises is checked before it is dialled, and a cluster
        # advertising a blocked one is refused here (BlockedAddress), before anything is read.
        guard = KafkaGuard() if self.cluster.guarded else None
        if guard is not None:
            guard.install(consumer._client)
        self._consumer = consumer
        try:
            await consumer.start()
            if guard is not None:
                await guard.check_cluster(consumer._client)
        except BaseException:
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        metrics.KAFKA_TRIGGER_PAUSED.labels(*self.labels).set(1 if self.paused else 0)
        self._task = asyncio.create_task(self._run(), name=f"kafka-trigger-{self.flow.id}")
        log.info("flow %s/%s reads topic %s (group %s%s)%s", *self.labels[:2], self.topic, self.group,
                 f", connector {self.connector}" if self.connector else "",
                 " — paused" if self.paused else "")  # fmt: skip

    async def stop(self) -> None:
        await cancelled(self._task)
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await self._consumer.stop()
        for gauge in (metrics.KAFKA_TRIGGER_LAG, metrics.KAFKA_TRIGGER_PAUSED):
            with contextlib.suppress(KeyError):
                gauge.remove(*self.labels)

    def set_paused(self, paused: bool, *, skip_to_newest: bool = False) -> None:
        """Paused: nothing more is fetched and the committed offsets stay where they are. Resumed: consumption goes
        on from there, or from the newest message when the flow says `resume_from: newest`."""
        self._skip_to_newest = self._skip_to_newest or skip_to_newest
        if paused == self.paused:
            return
        self.paused = paused
        metrics.KAFKA_TRIGGER_PAUSED.labels(*self.labels).set(1 if paused else 0)
        consumer = self._consumer
        if consumer is not None:
            (consumer.pause if paused else consumer.resume)(*consumer.assignment())
        (self._active.clear if paused else self._active.set)()
        log.info("flow %s/%s %s reading %s", *self.labels[:2], "stops" if paused else "resumes", self.topic)

    async def place(self, assigned: set[TopicPartition]) -> None:
        """Newly assigned partitions: from the group's committed offset; without one, from `start_from`.

        Every position is an offset looked up now and set at once: a lazy seek to the end (`seek_to_end`) would be
        resolved later, at the end as it is then, skipping what was produced meanwhile."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        fresh = [tp for tp in sorted(assigned) if await consumer.committed(tp) is None]
        if fresh:
            start = self.flow.trigger.start_from
            ends = await consumer.end_offsets(fresh)
            if start == "earliest":
                at = dict(await consumer.beginning_offsets(fresh))
            elif start == "latest":
                at = dict(ends)
            else:  # the first message produced after the flow read this topic; none yet: whatever comes next
                found = await consumer.offsets_for_times({tp: int(self.since.timestamp() * 1000) for tp in fresh})
                at = {tp: found[tp].offset if found.get(tp) is not None else ends[tp] for tp in fresh}
            for tp, offset in at.items():
                consumer.seek(tp, offset)
            # The start is the flow's place from now on, so a paused flow's waiting messages count as lag in
            # `flowtrail status` on every partition, not only on those that have had a message since.
            try:
                await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in at.items()})
            except KafkaError as exc:  # committed with the first batch instead
                log.warning("start offsets of %s/%s on %s not committed yet (%r)", *self.labels, exc)
        if self.paused:
            consumer.pause(*assigned)

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                if self.paused:  # nothing is fetched; the lag still shows what waits
                    if self._consumer is not None:
                        await self._measure_lag(self._consumer)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._active.wait(), 1.0)
                    continue
                await self.owner.backlog.open.wait()
                if self._skip_to_newest:
                    await self._to_newest()
                consumer = self._consumer
                assert consumer is not None
                batches = await consumer.getmany(timeout_ms=500, max_records=self.owner.limits.batch)
                if batches:
                    await self._handle(consumer, batches)
                await self._measure_lag(consumer)
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker away, PostgreSQL away, a bug: the same messages again, shortly
                log.exception("kafka trigger of %s/%s on %s failed; retrying in %.1f s", *self.labels, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _to_newest(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        assigned = consumer.assignment()
        if assigned:
            ends = await consumer.end_offsets(list(assigned))
            for tp, end in ends.items():
                consumer.seek(tp, end)
            await consumer.commit({tp: OffsetAndMetadata(end, "") for tp, end in ends.items()})
        self._skip_to_newest = False

    async def _handle(self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]) -> None:
        flow = self.flow
        tenant_id, flow_id = flow.tenant_id, flow.id
        window = None
        if any(s.action is StepAction.SYNC_RECORDS for s in flow.steps):
            window = await self.owner.windows(tenant_id, flow_id, flow.version)
        triggers: list[tuple[str, bytes]] = []
        dead: list[tuple[bytes, bytes, int | None]] = []
        filtered = 0
        limit = self.owner.trigger_log.appender.max_record_bytes
        for records in batches.values():
            for record in records:
                message = Message(record.topic, record.partition, record.offset, record.timestamp, record.key,
                                  record.value, tuple(record.headers or ()))  # fmt: skip
                outcome = admit(
                    message, flow.trigger, tenant_id, flow_id, max_value_bytes=self.owner.limits.max_value_bytes
                )
                if isinstance(outcome, Run):
                    trigger = TriggerReceived(
                        tenant_id=tenant_id, run_id=outcome.run_id, flow_id=flow_id, flow_version=flow.version,
                        trigger=TriggerInfo(type=TriggerType.KAFKA, caller=message.caller, payload=outcome.input),
                        environment=flow.environment, execution_mode=ExecutionMode.ASYNC,
                        idempotency_key=outcome.idempotency_key, cursor_window=window,
                    )  # fmt: skip
                    value = codec.dumps(trigger)
                    if len(value) + len(outcome.run_id) <= limit:
                        triggers.append((outcome.run_id, value))
                        continue
                    outcome = DeadLetter(f"oversize: the run request is {len(value):,} bytes; one Kafka record "
                                         f"holds {limit:,}")  # fmt: skip
                if isinstance(outcome, DeadLetter):
                    log.warning(
                        "%s of flow %s/%s dead-lettered: %s", message.caller, tenant_id, flow_id, outcome.reason
                    )
                    key = f"{tenant_id}/{flow_id}".encode()
                    dead.append((key, dead_letter(message, outcome.reason, tenant_id, flow_id, flow.version), None))
                elif isinstance(outcome, Filtered):
                    filtered += 1
        await self._durable(dead, triggers)
        offsets = {tp: OffsetAndMetadata(records[-1].offset + 1, "") for tp, records in batches.items() if records}
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance took the partitions: their new owner reads them again, same runs
            log.warning("offsets of %s/%s on %s not committed (%r); they will be read again", *self.labels, exc)
        counter = metrics.KAFKA_TRIGGER_MESSAGES
        counter.labels(*self.labels, "run").inc(len(triggers))
        counter.labels(*self.labels, "dead_lettered").inc(len(dead))
        counter.labels(*self.labels, "filtered").inc(filtered)

    async def _durable(self, dead: list[tuple[bytes, bytes, int | None]], triggers: list[tuple[str, bytes]]) -> None:
        """Appends until every record is durable: the offsets are committed only then. Appending again what was
        durable already is harmless: a trigger names the same run, a dead letter is one more copy of the same."""
        delay = 0.2
        while True:
            try:
                if dead:
                    await self.owner.dlq.append(self.owner.topics.dlq, dead)
                    dead = []
                await self.owner.trigger_log.append(triggers)
                return
            except AppendFailed as exc:
                metrics.KAFKA_TRIGGER_APPEND_FAILURES.inc()
                log.warning("triggers of %s/%s not all durable (%s); appending again in %.1f s", *self.labels[:2],
                            exc.reason, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _measure_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Messages not yet made into runs on the partitions this process holds: the partition's end (as the last
        fetch saw it; asked for while paused, when nothing is fetched) minus the position."""
        assigned = consumer.assignment()
        highs = {tp: None if self.paused else consumer.highwater(tp) for tp in assigned}
        unknown = [tp for tp, high in highs.items() if high is None]
        if unknown:
            highs.update(await consumer.end_offsets(unknown))
        lag = 0
        for tp, high in highs.items():
            lag += max(0, (high or 0) - await consumer.position(tp))
        metrics.KAFKA_TRIGGER_LAG.labels(*self.labels).set(lag)


class _Placement(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.subscription.place(assigned)


class KafkaTriggers:
    """Every kafka-triggered flow of the deployment, each a Subscription, kept in line with the flows topic."""

    def __init__(
        self, bootstrap: str, topics: Topics, trigger_log: TriggerLog, dlq: Appender, *, windows: Windows,
        limits: KafkaTriggerLimits = KafkaTriggerLimits(), connectors: ConnectorRegistry | None = None,
        allow_private: bool = False,
    ) -> None:  # fmt: skip
        self.bootstrap = bootstrap
        # The kafka connectors a trigger may name; a tenant's are guarded unless private networks are allowed.
        self.connectors = connectors or ConnectorRegistry({}, None, setting="FLOWTRAIL_INGEST_CONNECTORS")
        self.allow_private = allow_private
        self.topics = topics
        self.trigger_log = trigger_log
        self.dlq = dlq
        self.windows = windows
        self.limits = limits
        self.allowed = re.compile(limits.allowed_topics)
        self.backlog = Backlog(bootstrap, topics.triggers, f"{topics.prefix}-executor", limits.max_executor_lag)
        self.follower = FlowFollower(bootstrap, topics.flows, on_event=self._on_flow_event)
        self.subscriptions: dict[FlowKey, Subscription] = {}
        self._since: dict[tuple[str, str, str], datetime] = {}  # (tenant, flow, topic) → first published
        self._resumed: set[FlowKey] = set()  # resumed since the last reconcile (live events only)
        self._refused: set[tuple[str, str, str]] = set()
        self._unstarted: dict[FlowKey, tuple[tuple[str, str, str], str]] = {}  # why a flow's consumer did not start
        self._started = False
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.backlog.start()
        await self.follower.start()  # the flows topic up to its end: the state every subscription starts from
        self._started = True
        self._dirty.set()
        self._task = asyncio.create_task(self._follow(), name="kafka-triggers")

    async def stop(self) -> None:
        await cancelled(self._task)
        await asyncio.gather(*(s.stop() for s in self.subscriptions.values()))
        self.subscriptions.clear()
        await self.follower.stop()
        await self.backlog.stop()

    def _on_flow_event(self, event: FlowEventBase) -> None:
        if isinstance(event, FlowVersionPublished) and event.flow.trigger.type == "kafka" and event.flow.trigger.topic:
            self._since.setdefault((event.tenant_id, event.flow_id, event.flow.trigger.topic), event.occurred_at)
        if not self._started:
            return  # replayed history: start() reconciles from the state it left
        if isinstance(event, FlowResumed):
            self._resumed.add((event.tenant_id, event.flow_id))
        self._dirty.set()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), 5.0)  # also retries subscriptions that failed to start
            self._dirty.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("kafka trigger subscriptions not reconciled; retrying")

    def _wanted(self, flow: FlowDefinition) -> bool:
        topic = flow.trigger.topic
        if flow.trigger.type != "kafka" or not topic:
            return False
        if topic.startswith(f"{self.topics.prefix}.") or not self.allowed.fullmatch(topic):
            if (flow.tenant_id, flow.id, topic) not in self._refused:
                self._refused.add((flow.tenant_id, flow.id, topic))
                log.error("flow %s/%s: topic %r is not open to kafka triggers (Flowtrail's own, or outside "
                          "FLOWTRAIL_INGEST_KAFKA_TRIGGER_TOPICS)", flow.tenant_id, flow.id, topic)  # fmt: skip
            return False
        return True

    async def reconcile(self) -> None:
        """One subscription per active or paused kafka-triggered flow, on its latest version's topic."""
        wanted = {key: flow for key, flow in self.follower.latest.items() if self._wanted(flow)}
        for key, sub in list(self.subscriptions.items()):
            flow = wanted.get(key)
            # No longer kafka-triggered, or another topic or cluster.
            if flow is None or flow.trigger.topic != sub.topic or flow.trigger.connector != sub.connector:
                del self.subscriptions[key]
                await sub.stop()
        for key in [k for k in self._unstarted if k not in wanted]:
            self._clear_unstarted(key)
        resumed, self._resumed = self._resumed, set()
        for key, flow in wanted.items():
            paused = key in self.follower.paused
            found = self.subscriptions.get(key)
            if found is None:
                topic = flow.trigger.topic
                assert topic is not None
                since = self._since.get((*key, topic)) or self.follower.published_at[key]
                subscribed = await self._subscribe(key, flow, paused, since)
                if subscribed is None:
                    continue
                self.subscriptions[key] = found = subscribed
            sub = found
            sub.flow = flow
            newest = key in resumed and flow.trigger.resume_from == "newest"
            sub.set_paused(paused, skip_to_newest=newest and not paused)
        metrics.KAFKA_TRIGGER_SUBSCRIPTIONS.set(len(self.subscriptions))

    async def cluster(self, flow: FlowDefinition) -> KafkaCluster:
        """Where the flow's topic is: the deployment's cluster, or the cluster of the kafka connector it names
        (services/common/connectors.py). Raises StepError (unknown or unusable connector), BlockedAddress or
        UnresolvableHost (a tenant connector's broker refused by the guard, docs/network-guard.md)."""
        name = flow.trigger.connector
        if name is None:
            return KafkaCluster(self.bootstrap, guarded=False)
        resolved = await self.connectors.resolve(flow.tenant_id, flow.environment, name, ("kafka",), "kafka")
        return await kafka_cluster(resolved, allow_private=self.allow_private)

    async def _subscribe(
        self, key: FlowKey, flow: FlowDefinition, paused: bool, since: datetime
    ) -> Subscription | None:
        """The flow's subscription, started; None when it cannot start now (tried again at the next reconcile). A
        connector that cannot be used is logged once and shown by `flowtrail_ingest_kafka_trigger_unstarted`."""
        try:
            subscription = Subscription(self, flow, paused, since, await self.cluster(flow))
            try:
                await subscription.start()
            except BaseException:
                await subscription.stop()
                raise
        except StepError as exc:
            self._unstart(key, flow, exc.error.code or "connector", str(exc))
            return None
        except BlockedAddress as exc:  # the hint names ingest's own setting
            self._unstart(key, flow, "blocked_address", str(exc).replace(ALLOW_HINT, _INGEST_ALLOW_HINT))
            return None
        except UnresolvableHost as exc:
            self._unstart(key, flow, "unresolvable_host", str(exc))
            return None
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("flow %s/%s cannot read %s yet (%r); retrying", *key, flow.trigger.topic, exc)
            return None
        self._clear_unstarted(key)
        return subscription

    def _unstart(self, key: FlowKey, flow: FlowDefinition, reason: str, message: str) -> None:
        labels = (flow.tenant_id, flow.id, flow.trigger.topic or "")
        if self._unstarted.get(key) == (labels, reason):
            return  # said already
        self._clear_unstarted(key)
        self._unstarted[key] = (labels, reason)
        metrics.KAFKA_TRIGGER_UNSTARTED.labels(*labels, reason).set(1)
        log.error("flow %s/%s does not read %s (connector %r): %s; retrying every few seconds", *key, labels[2],
                  flow.trigger.connector, mask_text(message))  # fmt: skip

    def _clear_unstarted(self, key: FlowKey) -> None:
        before = self._unstarted.pop(key, None)
        if before is not None:
            with contextlib.suppress(KeyError):
                metrics.KAFKA_TRIGGER_UNSTARTED.remove(*before[0], before[1])
