"""Ledger compression: producer CPU against bytes on the broker, for each codec Kafka offers, on real ledger events.

The same events (10-step runs, as the executor writes them) are produced with the ledger writer's own settings and each
codec to a fresh topic; the figures are the producer's CPU per event (this process, `time.process_time`), the wall time
until every event is durable, and the bytes of the topic's log segments on the broker, each beside no compression in
the same run (docs/decisions.md, "No waiting on the hot path", says which codec the ledger uses and why).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from schemas import codec
from schemas.topics import partition_for
from services.common import kafka
from services.executor.settings import ExecutorSettings
from tests.bench.loaders import create_topic, delete_topics
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra
from tests.factories import run_events

CODECS = (None, "gzip", "snappy", "lz4", "zstd")


def _log_bytes(infra: Infra, topic: str, partitions: int) -> int | None:
    """The topic's log segments on the local broker (None when the broker is not the one the tests started)."""
    data = infra.state_dir / "kafka" / "data"
    dirs = [data / f"{topic}-{p}" for p in range(partitions)]
    if not all(d.is_dir() for d in dirs):
        return None
    return sum(f.stat().st_size for d in dirs for f in Path(d).glob("*.log"))


async def _produce(infra: Infra, records: list[tuple[bytes, bytes, int]], partitions: int,
                   compression: str | None) -> tuple[float, float, int | None]:  # fmt: skip
    topic = f"bench.compress.{compression or 'none'}.{uuid.uuid4().hex[:8]}"
    await create_topic(infra.kafka_bootstrap, topic, partitions)
    # The ledger writer's settings (services/executor/adapters/ledger.py), with the codec under test.
    producer = kafka.producer(infra.kafka_bootstrap, linger_ms=ExecutorSettings().producer_linger_ms,
                              max_batch_size=256 * 1024, compression_type=compression)  # fmt: skip
    await producer.start()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        futures = [await producer.send(topic, value, key=key, partition=p) for key, value, p in records]
        await asyncio.gather(*futures)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await producer.stop()
    await asyncio.sleep(0.5)  # the broker's log files are written by the time the acks came; let their sizes settle
    size = _log_bytes(infra, topic, partitions)
    await delete_topics(infra.kafka_bootstrap, [topic])
    return cpu, wall, size


async def test_ledger_compression(infra: Infra, scale: Scale, report: Report) -> None:
    runs = max(20, scale.kafka_messages // 24 // 4)
    events = [e for i in range(runs) for e in run_events(f"run{i:08d}", steps=scale.steps)]
    records = [(e.run_id.encode(), codec.dumps(e), partition_for(e.run_id, scale.partitions)) for e in events]
    raw_bytes = sum(len(k) + len(v) for k, v, _ in records)
    results: dict[str | None, tuple[float, float, int | None]] = {}
    for compression in CODECS:
        results[compression] = await _produce(infra, records, scale.partitions, compression)
    base_cpu, base_wall, base_size = results[None]
    n = len(records)
    report.details["ledger_compression"] = {
        "events": n, "raw_key_value_bytes": raw_bytes,
        "codecs": {str(c): {"cpu_s": r[0], "wall_s": r[1], "log_bytes": r[2]} for c, r in results.items()},
    }  # fmt: skip
    for compression, (cpu, wall, size) in results.items():
        name = compression or "none"
        report.add("compression", f"ledger produce CPU per event, {name} ({n:,} events)", cpu / n * 1e6, "us",
                   note=f"{cpu / base_cpu:.2f}x of none")  # fmt: skip
        report.add("compression", f"ledger produce events/s, {name}", n / wall, "events/s",
                   note=f"{base_wall / wall:.2f}x of none")  # fmt: skip
        if size is not None and base_size:
            report.add("compression", f"ledger bytes on the broker per event, {name}", size / n, "B",
                       note=f"{size / base_size:.2f}x of none")  # fmt: skip
        assert size is None or size > 0, f"no log segment bytes for {name}"
    # Every codec must have written every event: the sizes are of real logs, not of empty topics.
    assert all(r[2] is None or r[2] > n for r in results.values()), results
