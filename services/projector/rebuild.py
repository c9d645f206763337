"""`flowtrail projector rebuild | verify`: replay the whole ledger into a shadow schema and compare, then swap.

verify: the live tables' checksums and offsets are read in one snapshot; the shadow replays the log
up to exactly those offsets and its checksums are compared table by table. The snapshot stays open
through the replay, so for a table that differs the rows are compared key by key against the live rows
as of that same point (services/projector/compare.py): the first differing keys, the columns that differ
and the runs they belong to are reported.

rebuild: the same replay, then, holding the lock every projector batch takes shared, the shadow catches
up to the live offsets, the tables are compared, the control-plane tables (keys, tenants) are copied
over and the schemas are renamed in one transaction. Projectors notice the new schema by its oid and
carry on from the offsets stored in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import codec
from schemas.topics import Topics
from services.common.db import _quote_ident, connect
from services.common.kafka import topic_partitions
from services.common.migrate import migrate
from services.projector import compare, retention
from services.projector.adapters.store import Positioned, apply_batch, load_offsets, stage, swap_lock_key
from services.projector.collector import fewer_collections
from services.projector.settings import ProjectorSettings

log = logging.getLogger(__name__)

# Every table is either derived from the log (rebuilt and compared; value = its canonical row order)
# or control-plane state written by the API (copied). A new table must be added to one of the two.
DERIVED: dict[str, str] = {
    "runs": "id",
    "run_steps": "run_id, step",
    "run_events": "run_id, seq",
    "step_attempts": "run_id, step, attempt",
    "run_logs": "run_id, seq",
    "record_errors": "run_id, seq",
    "failure_groups": "tenant_id, environment, fingerprint",
    "flow_hourly": "tenant_id, flow_id, environment, hour, status, trigger_type",
    "step_outcomes": "tenant_id, environment, flow_id, flow_version, step",
    "endpoint_coverage": "tenant_id, environment, flow_id, method, host, route",
    "flows": "tenant_id, id",
    "flow_versions": "tenant_id, flow_id, version",
    "canonical_records": "tenant_id, environment, entity, canonical_id",
    "canonical_external_ids": "tenant_id, environment, entity, source, external_id",
    "alert_state": "rule_id",
    "alert_events": "id",
    "connector_health": "tenant_id, connector",
}
# Rows an edge writes that the ledger does not derive: a run's placeholder from its acceptance until its first event
# (services/common/accepted.py). Left out of the comparison.
_ONLY_DERIVED = {"runs": "WHERE t.last_seq >= 0"}
# In foreign-key order. Webhook deliveries are a record of what was sent, not derived: carried over as is.
CONTROL: tuple[str, ...] = (
    "tenants",
    "secrets",
    "connectors",
    "api_keys",
    "rate_limit_windows",
    "idempotency_keys",
    "retention_marks",
    "webhook_subscriptions",
    "webhook_deliveries",
    "webhook_attempts",
    "alert_rules",
    "alert_deliveries",
    "oncall_pages",
)
# Control-plane tables the replay reads (alert rules decide which alerts are derived): copied into the shadow
# before it replays, and again at the swap with the rest.
REPLAY_INPUTS = ("alert_rules",)
# The projector's own bookkeeping: neither replayed nor compared (purged_runs is re-made by the purge marks).
OWN = ("projector_offsets", "schema_migrations", "purged_runs")
# The executors' shared admission slots and queue: coordination state, not a read model (the executors reconcile them
# with their runs), so verify leaves them alone and a swap moves the live tables themselves into the rebuilt schema:
# an admission in flight, whose statement already resolved them, still writes where every executor reads after it.
COORDINATION = ("admission_slots", "admission_queue")

Progress = Callable[[str], None]
# Records decoded between two yields to the event loop while a batch is applied: decoding a whole fetch at once would
# keep the applying side from sending its next statement for that long.
_DECODE_SLICE = 200


@dataclass
class Comparison:
    tables: dict[str, tuple[tuple[int, str], tuple[int, str]]] = field(default_factory=dict)  # live, shadow
    differing_runs: list[str] = field(default_factory=list)
    # verify: per differing table, how many keys differ and the first of them with the columns that differ.
    rows: dict[str, compare.TableDifference] = field(default_factory=dict)

    @property
    def differing_tables(self) -> list[str]:
        return [t for t, (live, shadow) in self.tables.items() if live != shadow]

    @property
    def equal(self) -> bool:
        return not self.differing_tables


def describe(comparison: Comparison) -> str:
    """verify's report of what differs, for a person (the CLI prints it, tests show it when they fail)."""
    if comparison.equal:
        return "read models match the ledger"
    lines = []
    for table in comparison.differing_tables:
        (live_rows, _), (rebuilt_rows, _) = comparison.tables[table]
        diff = comparison.rows.get(table)
        if diff is None:
            lines.append(f"{table}: {live_rows:,} live rows, {rebuilt_rows:,} rebuilt, checksums differ")
        else:
            lines += compare.describe_rows(table, diff)
    if comparison.differing_runs:
        lines.append("runs that differ: " + ", ".join(comparison.differing_runs))
    return "\n".join(lines)


@dataclass
class Outcome:
    events: int
    seconds: float
    comparison: Comparison
    swapped_to: str | None = None  # the name the old live schema was renamed to
    # verify: seconds spent in each step, in order (the shadow schema, the live checksums, the replay, the shadow's
    # checksums, the key-wise comparison of differing tables): where a slow verify's time went.
    phases: dict[str, float] = field(default_factory=dict)


# The tables that take longest to sum, taken first when several connections share the work, so the rest even out.
_LARGEST = ("run_events", "run_logs", "run_steps", "step_attempts")


async def checksums(conn: asyncpg.Connection, schema: str, *more: asyncpg.Connection) -> dict[str, tuple[int, str]]:
    """Per derived table: (rows, md5 over every row's md5 in canonical order). `more`: other connections to the same
    database that sum tables at the same time (each table on one connection; nothing may write to `schema`
    meanwhile, as each connection reads its own snapshot)."""
    q = _quote_ident(schema)
    waiting = [t for t in DERIVED if t not in _LARGEST][::-1] + [t for t in _LARGEST if t in DERIVED][::-1]
    out = {}

    async def sum_tables(c: asyncpg.Connection) -> None:
        while waiting:
            table = waiting.pop()
            row = await c.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg(md5(t::text), '' ORDER BY {DERIVED[table]}), '')) AS h "
                f"FROM {q}.{table} t {_ONLY_DERIVED.get(table, '')}"
            )
            out[table] = (int(row["n"]), str(row["h"]))

    await asyncio.gather(*(sum_tables(c) for c in (conn, *more)))
    return {t: out[t] for t in DERIVED}


async def _live_checksums(dsn: str, admin: asyncpg.Connection, live: str) -> dict[str, tuple[int, str]]:
    """The live checksums in `admin`'s open snapshot, summed on it and on a second connection that imports it."""
    exported = await admin.fetchval("SELECT pg_export_snapshot()")
    helper = await connect(dsn, live)
    try:
        async with helper.transaction(isolation="repeatable_read", readonly=True):
            await helper.execute(f"SET TRANSACTION SNAPSHOT '{exported}'")  # made by PostgreSQL: digits and dashes
            return await checksums(admin, live, helper)
    finally:
        await helper.close()


# Each table of a schema with the tables that reference it by foreign key (itself left out).
_REFERENCED_BY = """
SELECT c.relname AS table_name,
       coalesce(array_agg(r.relname) FILTER (WHERE r.relname IS NOT NULL AND r.oid <> c.oid), '{}') AS referenced_by
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_constraint k ON k.confrelid = c.oid AND k.contype = 'f'
LEFT JOIN pg_class r ON r.oid = k.conrelid
WHERE n.nspname = $1 AND c.relkind = 'r'
GROUP BY c.relname
"""


async def _unlogged(conn: asyncpg.Connection, schema: str) -> None:
    """verify's shadow schema is dropped after the comparison, so its tables need not survive a crash: unlogged, the
    replay's rows write no WAL (a row's text, and so every checksum, is the same either way). Only the tables most rows
    go to (`_LARGEST`): making a table unlogged syncs a new file for it and each of its indexes, which for every table
    cost more than the replay of 48,000 events saved. PostgreSQL refuses to make a table unlogged while a logged one
    references it, so the tables that reference these are made unlogged too, first."""
    q = _quote_ident(schema)
    referenced_by = {r["table_name"]: set(r["referenced_by"]) for r in await conn.fetch(_REFERENCED_BY, schema)}
    # The tables most rows are written to, and those that reference them (PostgreSQL requires those unlogged too).
    wanted, grow = set(_LARGEST), set(_LARGEST)
    while grow:
        grow = {r for t in grow for r in referenced_by.get(t, ())} - wanted
        wanted |= grow
    pending = {t: referenced_by[t] & wanted for t in wanted if t in referenced_by}
    statements = []
    while pending:
        ready = sorted(t for t, referencing in pending.items() if not referencing & pending.keys())
        if not ready:
            raise RuntimeError(f"foreign keys in a cycle among {sorted(pending)}: cannot make them unlogged")
        for table in ready:
            statements.append(f"ALTER TABLE {q}.{_quote_ident(table)} SET UNLOGGED")
            del pending[table]
    # One transaction, one commit that need not wait for the disk: a crash before the replay ends loses only a
    # shadow schema that is dropped anyway.
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute(";\n".join(statements))


async def _check_tables_are_classified(conn: asyncpg.Connection, schema: str) -> None:
    tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)}
    unknown = sorted(tables - set(DERIVED) - set(CONTROL) - set(OWN) - set(COORDINATION))
    if unknown:
        raise RuntimeError(
            f"table(s) {', '.join(unknown)} are neither derived nor control-plane: classify them in {__name__}"
        )


class Replayer:
    """Reads the ledger and flows topics from offset 0 into the shadow schema, up to target offsets."""

    def __init__(self, settings: ProjectorSettings, shadow: asyncpg.Connection, progress: Progress) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.shadow = shadow
        self.progress = progress
        self.events = 0
        self.started = time.monotonic()
        self._last_report = 0.0

    async def __aenter__(self) -> Replayer:
        await stage(self.shadow)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await self.consumer.start()
        known = await topic_partitions(self.settings.kafka_bootstrap, [self.topics.ledger, self.topics.flows])
        parts = [TopicPartition(topic, p) for topic, partitions in sorted(known.items()) for p in partitions]
        if not parts:
            await self.consumer.stop()
            raise RuntimeError(f"topics {self.topics.ledger} and {self.topics.flows} do not exist: nothing to replay")
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.partitions = parts
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def end_offsets(self) -> dict[TopicPartition, int]:
        return dict(await self.consumer.end_offsets(self.partitions))

    async def replay_to(self, targets: dict[TopicPartition, int], total_hint: int | None = None) -> None:
        """Apply every record below each partition's target offset; returns when all are reached. The next fetch is
        read and decoded while a batch is applied (PostgreSQL works in its own process, so the two overlap)."""
        remaining = {tp for tp in self.partitions if targets.get(tp, 0) > await self.consumer.position(tp)}
        self.consumer.pause(*[tp for tp in self.partitions if tp not in remaining])
        self.consumer.resume(*remaining)
        total = total_hint if total_hint is not None else sum(targets.values())
        # At most two decoded batches wait: memory stays bounded by the batch size.
        fetched: asyncio.Queue[list[Positioned] | BaseException | None] = asyncio.Queue(maxsize=2)
        reader = asyncio.create_task(self._read_to(targets, remaining, fetched))
        try:
            while (batch := await fetched.get()) is not None:
                if isinstance(batch, BaseException):
                    raise batch
                await apply_batch(self.shadow, self.settings.consumer_group, batch, side_effects=False, staged=True)
                self.events += len(batch)
                self._report(total)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._report(total, final=True)

    async def _read_to(
        self,
        targets: dict[TopicPartition, int],
        remaining: set[TopicPartition],
        out: asyncio.Queue[list[Positioned] | BaseException | None],
    ) -> None:
        try:
            while remaining:
                fetched = await self.consumer.getmany(
                    *remaining, timeout_ms=500, max_records=self.settings.batch_max_records
                )
                batch: list[Positioned] = []
                for tp, records in fetched.items():
                    decode = codec.decode_flow_event if tp.topic == self.topics.flows else codec.decode_ledger_event
                    for i, record in enumerate(records):
                        if i % _DECODE_SLICE == _DECODE_SLICE - 1:
                            await asyncio.sleep(0)  # let the applying side go on as soon as PostgreSQL answers
                        if record.offset >= targets[tp]:
                            # Fetched past the target: the next catch-up starts exactly here.
                            self.consumer.seek(tp, targets[tp])
                            break
                        try:
                            event = decode(record.value)
                        except codec.DecodeError:
                            event = None  # the live projector dead-lettered it; skip it the same way
                        batch.append(Positioned(tp.topic, tp.partition, record.offset, event))
                for tp in list(remaining):
                    if await self.consumer.position(tp) >= targets[tp]:
                        remaining.discard(tp)
                        self.consumer.pause(tp)
                if batch:
                    await out.put(batch)
            await out.put(None)
        except Exception as exc:  # handed to the applying side, which raises it
            await out.put(exc)

    def _report(self, total: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_report < 1.0:
            return
        self._last_report = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.events / elapsed
        left = max(total - self.events, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 and not final else "0s"
        self.progress(f"replayed {self.events:,}/{total:,} events  {rate:,.0f} events/s  ETA {eta}")


class LogBehindReadModels(RuntimeError):
    """The read models say they projected records the log does not have: nothing can be replayed up to them."""


def _check_log_reaches(targets: dict[TopicPartition, int], ends: dict[TopicPartition, int]) -> None:
    """Refuse at once (a replay would wait forever) when a partition ends before the offset the read models record:
    the log was truncated or replaced — its broker's data lost, or the bootstrap naming another cluster."""
    behind = sorted((tp.topic, tp.partition, target, ends.get(tp, 0)) for tp, target in targets.items()
                    if target > ends.get(tp, 0))  # fmt: skip
    if behind:
        where = "; ".join(f"{t}[{p}] recorded up to offset {want:,}, the log ends at {end:,}"
                          for t, p, want, end in behind)  # fmt: skip
        raise LogBehindReadModels(
            f"the read models were projected from records this log does not have ({where}): the log was truncated "
            "or replaced (the broker's data lost, or FLOWTRAIL_KAFKA_BOOTSTRAP names another cluster), so they "
            "cannot be checked or rebuilt against it"
        )


def _targets_from(offsets: dict[str, dict[int, int]], partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    return {tp: offsets.get(tp.topic, {}).get(tp.partition, 0) for tp in partitions}


async def _live_offsets(conn: asyncpg.Connection, group: str, topics: Topics) -> dict[str, dict[int, int]]:
    return {t: await load_offsets(conn, group, t) for t in (topics.ledger, topics.flows)}


async def _differing_rows(
    comparison: Comparison,
    live: asyncpg.Connection,
    live_schema: str,
    shadow: asyncpg.Connection,
    shadow_schema: str,
    limit: int,
) -> None:
    """Key-wise comparison of each differing table; `live` reads the snapshot the live checksums came from."""
    async with shadow.transaction(isolation="repeatable_read", readonly=True):
        for table in comparison.differing_tables:
            comparison.rows[table] = await compare.diff_table(
                live, live_schema, shadow, shadow_schema, table, DERIVED[table],
                where=_ONLY_DERIVED.get(table, ""), limit=limit,
            )  # fmt: skip
    comparison.differing_runs = compare.differing_runs(comparison.rows)


async def run(
    settings: ProjectorSettings, *, swap: bool, progress: Progress, keep_shadow: bool = False, show: int = 20
) -> Outcome:
    """`show`: verify lists up to this many differing keys per table."""
    with fewer_collections():
        return await _run(settings, swap=swap, progress=progress, keep_shadow=keep_shadow, show=show)


async def _run(settings: ProjectorSettings, *, swap: bool, progress: Progress, keep_shadow: bool, show: int) -> Outcome:
    live = settings.database_schema
    shadow = f"{live}__rebuild"
    topics = Topics(settings.topic_prefix)
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name], mark = now - mark, now

    admin = await connect(settings.database_url, live)
    try:
        await migrate(admin, live)
        await _check_tables_are_classified(admin, live)
        await admin.execute(f"DROP SCHEMA IF EXISTS {_quote_ident(shadow)} CASCADE")
        await migrate(admin, shadow)
        if not swap and not keep_shadow:
            await _unlogged(admin, shadow)
        for table in REPLAY_INPUTS:
            q_live, q_shadow = _quote_ident(live), _quote_ident(shadow)
            await admin.execute(f"INSERT INTO {q_shadow}.{table} SELECT * FROM {q_live}.{table}")
        phase("shadow schema")
        # The live tables and the offsets they reflect, read in one snapshot. verify keeps it open (read only)
        # until the comparison is done, so differing rows are read as of the offsets the shadow replays to.
        snapshot = admin.transaction(isolation="repeatable_read", readonly=True)
        await snapshot.start()
        live_offsets = await _live_offsets(admin, settings.consumer_group, topics)
        live_marks = await retention.recorded_marks(admin)
        if swap:
            await snapshot.commit()  # a swap compares the tables it takes over, under the lock
        else:
            live_sums = await _live_checksums(settings.database_url, admin, live)
            phase("live checksums")
        shadow_conn = await connect(settings.database_url, shadow)
        # The replay's commits need not wait for the WAL flush: until the swap (committed on `admin`, which flushes
        # everything written before it) nothing reads the shadow, and a crash leaves only a replay to start again.
        await shadow_conn.execute("SET synchronous_commit = off")
        try:
            async with Replayer(settings, shadow_conn, progress) as replayer:
                targets = _targets_from(live_offsets, replayer.partitions)
                ends = await replayer.end_offsets()
                _check_log_reaches(targets, ends)
                progress(f"replaying {sum(targets.values()):,} records of {sum(ends.values()):,} into {shadow}")
                await replayer.replay_to(targets)
                if not swap:
                    # The live schema has had these purges; the replay brought the purged rows back.
                    await retention.apply_marks(shadow_conn, live_marks, record=False)
                    phase("replay")
                    # Not on `admin`: its snapshot predates every row the replay wrote. Two connections share them.
                    helper = await connect(settings.database_url, shadow)
                    try:
                        shadow_sums = await checksums(shadow_conn, shadow, helper)
                    finally:
                        await helper.close()
                    comparison = Comparison({t: (live_sums[t], shadow_sums[t]) for t in DERIVED})
                    phase("shadow checksums")
                    if not comparison.equal:
                        await _differing_rows(comparison, admin, live, shadow_conn, shadow, show)
                        phase("differing rows")
                    await snapshot.commit()
                    if not keep_shadow:
                        await admin.execute(f"DROP SCHEMA IF EXISTS {_quote_ident(shadow)} CASCADE")
                    progress("took " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items()))
                    return Outcome(replayer.events, time.monotonic() - replayer.started, comparison, phases=phases)
                outcome = await _swap(settings, admin, shadow_conn, replayer, live, shadow, topics, progress)
                return outcome
        finally:
            await shadow_conn.close()
    finally:
        if admin.is_in_transaction():
            await snapshot.rollback()
        await admin.close()


async def _swap(
    settings: ProjectorSettings,
    admin: asyncpg.Connection,
    shadow_conn: asyncpg.Connection,
    replayer: Replayer,
    live: str,
    shadow: str,
    topics: Topics,
    progress: Progress,
) -> Outcome:
    lq, sq = _quote_ident(live), _quote_ident(shadow)
    old = f"{live}__old_{datetime.now(UTC):%Y%m%d%H%M%S}"
    # Catch up without the lock first, so the projectors are held back only for the last stretch.
    for _ in range(3):
        current = await _live_offsets(admin, settings.consumer_group, topics)
        await replayer.replay_to(_targets_from(current, replayer.partitions))
    async with admin.transaction():
        progress("holding the projector lock: final catch-up, compare, swap")
        await admin.execute("SELECT pg_advisory_xact_lock(hashtext($1))", swap_lock_key(live))
        final = _targets_from(await _live_offsets(admin, settings.consumer_group, topics), replayer.partitions)
        await replayer.replay_to(final)
        await retention.apply_marks(shadow_conn, await retention.recorded_marks(admin), record=False)
        live_sums = await checksums(admin, live)
        shadow_sums = await checksums(admin, shadow)
        comparison = Comparison({t: (live_sums[t], shadow_sums[t]) for t in DERIVED})
        for table in reversed(CONTROL):
            await admin.execute(f"DELETE FROM {sq}.{table}")
        for table in CONTROL:
            await admin.execute(f"INSERT INTO {sq}.{table} SELECT * FROM {lq}.{table}")
        for table in COORDINATION:
            await admin.execute(f"DROP TABLE {sq}.{table}")
            await admin.execute(f"ALTER TABLE {lq}.{table} SET SCHEMA {sq}")
        # Runs accepted but not yet in the ledger stay visible across the swap.
        await admin.execute(f"INSERT INTO {sq}.runs SELECT * FROM {lq}.runs WHERE last_seq < 0 ON CONFLICT DO NOTHING")
        await admin.execute(f"ALTER SCHEMA {lq} RENAME TO {_quote_ident(old)}")
        await admin.execute(f"ALTER SCHEMA {sq} RENAME TO {lq}")
    return Outcome(replayer.events, time.monotonic() - replayer.started, comparison, swapped_to=old)
