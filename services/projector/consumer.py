"""The projector's edge: consume ledger and flows, apply each fetch as one transaction with its offsets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from schemas import codec
from schemas.topics import Topics
from services.common.db import connect, create_pool, pool_problem
from services.common.migrate import migrate
from services.common.startup import FIRST_TRY_S, retry_forever
from services.projector import metrics, retention
from services.projector.adapters import alerts, webhooks
from services.projector.adapters.store import (
    BatchResult,
    Positioned,
    SchemaGuard,
    SchemaSwapped,
    apply_batch,
    load_offsets,
    schema_oid,
    stage,
)
from services.projector.settings import ProjectorSettings

log = logging.getLogger(__name__)

# PostgreSQL away (stopped, restarting, unreachable): a batch is tried again, the process goes on.
DATABASE_AWAY = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                 asyncpg.OperatorInterventionError)  # fmt: skip


class _DatabaseLost(Exception):
    """PostgreSQL failed under a batch. With `synchronous_commit` off the batches committed just before may be lost
    with it (rows and offsets together), so the projector goes on from the offsets stored in PostgreSQL, not from
    where it had read to."""


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """Offsets live in PostgreSQL with the rows (invariant 3); Kafka's committed offsets are not used."""

    def __init__(self, projector: Projector) -> None:
        self.projector = projector

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Eager rebalancing: everything is revoked, then the new assignment arrives.
        metrics.ASSIGNED.set(0)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.projector.seek_assigned(assigned)


class _Backlog:
    """Decoded records waiting for the next transaction; the reader stops fetching once `limit` wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[Positioned] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def add(self, batch: list[Positioned]) -> None:
        if not batch:
            return
        self.items.extend(batch)
        self._ready.set()
        if len(self.items) >= self.limit:
            self._room.clear()

    def take(self) -> list[Positioned]:
        batch, self.items = self.items, []
        self._ready.clear()
        self._room.set()
        return batch

    async def wait(self) -> None:
        await self._ready.wait()

    async def room(self) -> None:
        await self._room.wait()


class Projector:
    def __init__(self, settings: ProjectorSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.pool: asyncpg.Pool | None = None
        # The connection batches are applied on, kept between batches (no pool reset per batch) with its staging
        # table made once; dropped when it fails or the schema is swapped.
        self._batch_conn: asyncpg.pool.PoolConnectionProxy | None = None
        self.ready = asyncio.Event()
        self.applied_batches = 0
        self._reactors: list[asyncio.Task[None]] = []
        # Set once Kafka answered (`start`); until then /readyz names what the start waits for.
        self.consumer: AIOKafkaConsumer
        self.dlq: AIOKafkaProducer
        self.kafka_started = False
        self.waiting_for: str | None = "starting"

    async def start(self) -> None:
        """PostgreSQL reached and migrated, then Kafka: each retried until it answers (never a crash loop while a
        dependency is away; /readyz says which one is awaited, docs/operations.md)."""
        await retry_forever("PostgreSQL", self._first_connect, failed=self._waiting)
        await retry_forever("Kafka", self._start_kafka, failed=self._waiting)
        self.waiting_for = None
        self._reactors = [asyncio.create_task(self.alert_loop()), asyncio.create_task(self.alert_clock_loop())]

    def _waiting(self, problem: str) -> None:
        self.waiting_for = problem

    async def _first_connect(self) -> None:
        settings = self.settings
        conn = await asyncio.wait_for(connect(settings.database_url, settings.database_schema), FIRST_TRY_S)
        try:
            await migrate(conn, settings.database_schema)
        finally:
            await conn.close()
        await self._connect()

    async def _start_kafka(self) -> None:
        settings = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.consumer_group,
            # Static membership, as the executor's (docs/decisions.md): a restart after a kill takes its partitions
            # back at once.
            group_instance_id=settings.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # A topic created moments before can be missing from the broker's first metadata answer: the group then
            # assigns nothing, and only a metadata refresh (default every 5 minutes) brings the rebalance that fixes
            # it. Refreshing often bounds that wait to seconds.
            metadata_max_age_ms=3_000,
        )
        dlq = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        try:
            await dlq.start()
            await consumer.start()
        except BaseException:
            await asyncio.gather(dlq.stop(), consumer.stop(), return_exceptions=True)
            raise
        self.consumer, self.dlq, self.kafka_started = consumer, dlq, True
        self.consumer.subscribe([self.topics.ledger, self.topics.flows], listener=_SeekToStoredOffsets(self))

    async def _connect(self) -> None:
        pool = await create_pool(self.settings.database_url, self.settings.database_schema, max_size=4,
                                 timeout=FIRST_TRY_S)  # fmt: skip
        try:
            async with pool.acquire() as conn:
                self.guard = SchemaGuard(
                    self.settings.database_schema, await schema_oid(conn, self.settings.database_schema)
                )
        except BaseException:
            await pool.close()
            raise
        self.pool = pool

    async def _follow_swap(self) -> None:
        """A rebuild swapped in a new schema: new connections, then carry on from the offsets stored in it."""
        log.warning("schema %s was replaced by a rebuild; reconnecting and seeking to its offsets", self.guard.name)
        assert self.pool is not None
        await self._drop_batch_conn()
        await self.pool.close()
        await self._connect()
        await self.seek_assigned(sorted(self.consumer.assignment()))
        metrics.SCHEMA_SWAPS.inc()

    async def stop(self) -> None:
        for task in self._reactors:
            task.cancel()
        await asyncio.gather(*self._reactors, return_exceptions=True)
        if self.kafka_started:
            await self.consumer.stop()
            await self.dlq.stop()
        if self.pool:
            await self._drop_batch_conn()
            await self.pool.close()

    async def readiness(self) -> dict[str, str]:
        """For /readyz: each thing the projector needs to keep the read models current, "ok" or the problem."""
        checks = {"partitions": "ok" if self.ready.is_set() else "not assigned yet"}
        if self.pool is None:
            checks["postgres"] = self.waiting_for or "not connected"
        else:
            checks["postgres"] = await pool_problem(self.pool) or "ok"
        if not self.kafka_started:
            checks["kafka"] = self.waiting_for if self.pool is not None and self.waiting_for else "not connected yet"
            return checks
        try:
            async with asyncio.timeout(3):
                await self.consumer._client.fetch_all_metadata()  # aiokafka exposes no public check
            checks["kafka"] = "ok"
        except Exception as exc:  # unreachable or timed out: either means not ready
            checks["kafka"] = f"Kafka unreachable: {exc!r}"
        return checks

    async def seek_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            for topic in {tp.topic for tp in assigned}:
                stored = await load_offsets(conn, self.settings.consumer_group, topic)
                for tp in (tp for tp in assigned if tp.topic == topic):
                    if tp.partition in stored:
                        self.consumer.seek(tp, stored[tp.partition])
                    else:
                        await self.consumer.seek_to_beginning(tp)
        metrics.ASSIGNED.set(len(assigned))
        self.ready.set()
        log.info("projecting %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))

    async def run(self) -> None:
        """Fetch and decode while the previous transaction is applied (PostgreSQL works in its own process,
        so the two overlap); each transaction takes everything read so far, so under load transactions grow
        instead of queueing. On a schema swap or when PostgreSQL failed, drop what was read ahead and go on from the
        stored offsets."""
        while True:
            backlog = _Backlog(self.settings.batch_max_records)
            reader = asyncio.create_task(self._read(backlog))
            resume = self._follow_swap
            try:
                await self._apply_from(backlog, reader)
            except SchemaSwapped:
                pass
            except _DatabaseLost:
                resume = self._seek_when_back
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            await resume()

    async def _read(self, backlog: _Backlog) -> None:
        while True:
            await backlog.room()
            fetched = await self.consumer.getmany(
                timeout_ms=self.settings.batch_wait_ms, max_records=self.settings.batch_max_records
            )
            batch: list[Positioned] = []
            for tp, records in fetched.items():
                decode = codec.decode_flow_event if tp.topic == self.topics.flows else codec.decode_ledger_event
                for record in records:
                    try:
                        event = decode(record.value)
                    except codec.DecodeError as exc:
                        await self._dead_letter(tp, record.offset, record.key, record.value, str(exc))
                        # Still advance past it: the offset is saved with the next transaction.
                        batch.append(Positioned(tp.topic, tp.partition, record.offset, None))
                        continue
                    batch.append(Positioned(tp.topic, tp.partition, record.offset, event))
            backlog.add(batch)

    async def _apply_from(self, backlog: _Backlog, reader: asyncio.Task[None]) -> None:
        assert self.pool is not None
        while True:
            ready = asyncio.ensure_future(backlog.wait())
            await asyncio.wait({ready, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                reader.result()  # the reader died: its exception ends the process, the supervisor restarts it
            batch = backlog.take()
            started = time.perf_counter()
            result = await self._apply_until_done(batch)
            metrics.BATCHES.observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.observe(len(batch))
            for status, count in result.finished.items():
                metrics.RUNS_FINISHED.labels(status).inc(count)
            self._record_lag(batch)
            metrics.EVENTS.labels("applied").inc(result.events - result.duplicates)
            metrics.EVENTS.labels("duplicate").inc(result.duplicates)
            self.applied_batches += 1

    async def _apply_until_done(self, batch: list[Positioned]) -> BatchResult:
        """One transaction for the batch: the rows and offsets commit together or not at all. While PostgreSQL is
        away the projector waits for it and goes on from the offsets stored there (`_seek_when_back`; no process
        restart, no rejoin of the group)."""
        assert self.pool is not None
        try:
            if self._batch_conn is None:
                conn = await self.pool.acquire()
                try:
                    await stage(conn)
                    if not self.settings.synchronous_commit:
                        await conn.execute("SET synchronous_commit = off")  # the pool's reset undoes it on release
                except BaseException:
                    await self.pool.release(conn)
                    raise
                self._batch_conn = conn
            return await apply_batch(self._batch_conn, self.settings.consumer_group, batch, self.guard, staged=True)
        except DATABASE_AWAY as exc:
            await self._drop_batch_conn()
            log.warning("a batch of %d records could not be applied (%r); going on from the stored offsets once "
                        "PostgreSQL answers", len(batch), exc)  # fmt: skip
            raise _DatabaseLost from exc

    async def _seek_when_back(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.seek_assigned(sorted(self.consumer.assignment()))
                return
            except DATABASE_AWAY as exc:
                log.warning("PostgreSQL still away (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _drop_batch_conn(self) -> None:
        conn, self._batch_conn = self._batch_conn, None
        if conn is not None and self.pool is not None:
            with contextlib.suppress(*DATABASE_AWAY):
                await self.pool.release(conn, timeout=2)

    def _record_lag(self, batch: list[Positioned]) -> None:
        last: dict[tuple[str, int], int] = {}
        for p in batch:
            last[(p.topic, p.partition)] = max(last.get((p.topic, p.partition), -1), p.offset)
        for (topic, partition), offset in last.items():
            end = self.consumer.highwater(TopicPartition(topic, partition))
            if end is not None:
                metrics.LAG.labels(topic, str(partition)).set(max(0, end - offset - 1))

    async def webhook_loop(self) -> None:
        """Sends due webhook deliveries; an error is logged and the loop goes on."""
        assert self.pool is not None
        dispatcher = webhooks.Dispatcher(
            self.pool,
            allow_private=self.settings.webhook_allow_private_networks,
            backoff_s=self.settings.webhook_backoff_s,
        )
        try:
            while True:
                # A rebuild's swap closes the pool and opens one on the new schema: always send through the current.
                if self.pool is not None:
                    dispatcher.pool = self.pool
                try:
                    sent = await dispatcher.run_once()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    log.exception("webhook dispatch failed; retrying")
                    sent = 0
                if not sent:
                    await asyncio.sleep(self.settings.webhook_poll_s)
        finally:
            await dispatcher.close()

    async def alert_loop(self) -> None:
        """Sends due alert deliveries; reads self.pool each time, as a rebuild's swap replaces it."""
        dispatcher = alerts.Dispatcher(self.settings)
        try:
            while True:
                try:
                    sent = await dispatcher.run_once(self.pool) if self.pool is not None else 0
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    log.exception("alert dispatch failed; retrying")
                    sent = 0
                if not sent:
                    await asyncio.sleep(self.settings.alert_poll_s)
        finally:
            await dispatcher.close()

    async def alert_clock_loop(self) -> None:
        """The no_success clock. It judges silence as of the last look at the ledger's end, and only once
        everything that was in the ledger then is projected: a lagging projector has not seen the successes."""
        interval = self.settings.alert_clock_s
        looked: tuple[datetime, dict[int, int]] | None = None
        while interval > 0:
            try:
                now = datetime.now(UTC)
                parts = self.consumer.partitions_for_topic(self.topics.ledger) or set()
                ends = await self.consumer.end_offsets([TopicPartition(self.topics.ledger, p) for p in parts])
                if looked is not None and self.pool is not None:
                    async with self.pool.acquire() as conn:
                        stored = await load_offsets(conn, self.settings.consumer_group, self.topics.ledger)
                    if all(stored.get(p, 0) >= end for p, end in looked[1].items()):
                        await alerts.tick(self.pool, looked[0], lock_key=self.guard.lock_key)
                looked = (now, {tp.partition: end for tp, end in ends.items()})
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, KafkaError):
                log.exception("alert clock failed; retrying in %.1fs", interval)
            await asyncio.sleep(interval)

    async def retention_loop(self) -> None:
        """Purge by each tenant's retention periodically; a failed purge is logged and retried next time."""
        interval = self.settings.retention_interval_s
        while interval > 0:
            assert self.pool is not None
            try:
                async with self.pool.acquire() as conn:
                    result = await retention.purge(conn, datetime.now(UTC))
                metrics.PURGED_RUNS.inc(result.runs_deleted)
            except (asyncpg.PostgresError, OSError):
                log.exception("retention purge failed; retrying in %.0fs", interval)
            await asyncio.sleep(interval)

    async def _dead_letter(self, tp: TopicPartition, offset: int, key: bytes | None, value: bytes, reason: str) -> None:
        metrics.DEAD_LETTERS.inc()
        log.warning("dead-lettering %s[%s]@%s: %s", tp.topic, tp.partition, offset, reason)
        await self.dlq.send_and_wait(
            self.topics.dlq,
            value,
            key=key,
            headers=[
                ("flowtrail-reason", reason.encode()),
                ("flowtrail-source", f"{tp.topic}[{tp.partition}]@{offset}".encode()),
            ],
        )
