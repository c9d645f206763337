"""Export: `flowtrail export` of a ledger backlog to Parquet, events/s against a raw consume of the same topic."""

from __future__ import annotations

import time
from pathlib import Path

from aiokafka import TopicPartition

from deploy.launcher.export_files import export
from services.common.kafka import follower, topic_partitions
from tests.bench.ceilings import KafkaCeiling
from tests.bench.loaders import bench_sandbox, produce_history
from tests.bench.report import Report
from tests.bench.scale import Scale
from tests.conftest import Infra
from tests.factories import run_events


async def _raw_consume(bootstrap: str, topic: str) -> tuple[int, float]:
    """Records of `topic` read to its end with no decoding, and the seconds it took."""
    parts = [TopicPartition(topic, p) for p in (await topic_partitions(bootstrap, [topic]))[topic]]
    consumer = follower(bootstrap)
    await consumer.start()
    try:
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        t0, read, want = time.perf_counter(), 0, sum(ends.values())
        while read < want:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            read += sum(len(records) for records in batch.values())
        return read, time.perf_counter() - t0
    finally:
        await consumer.stop()


async def test_export_rate_against_raw_consume(
    infra: Infra, scale: Scale, report: Report, tmp_path: Path, kafka_ceiling: KafkaCeiling
) -> None:
    template = run_events("run_template", steps=scale.steps)
    runs = scale.projection_runs
    async with bench_sandbox(infra, scale.partitions) as box:
        await produce_history(infra.kafka_bootstrap, box.topics.ledger, box.partitions, template, runs)
        total = runs * len(template)
        read, raw_s = await _raw_consume(infra.kafka_bootstrap, box.topics.ledger)
        t0 = time.perf_counter()
        counts = await export(infra.kafka_bootstrap, box.topics, tmp_path / "out")
        export_s = time.perf_counter() - t0
    assert read == total
    assert counts["events"] == total and counts["runs"] == runs, counts
    assert counts["steps"] == runs * scale.steps, counts
    report.add("throughput", f"raw consume of the same ledger, {total:,} events", read / raw_s, "events/s",
               ceiling="kafka.consume")  # fmt: skip
    report.add("throughput", f"flowtrail export to Parquet events/s, {total:,} events", total / export_s, "events/s",
               ceiling="kafka.consume")  # fmt: skip
    report.details["export"] = {
        "events": total, "runs": runs, "steps_per_run": scale.steps, "rows": counts, "export_seconds": export_s,
        "raw_consume_seconds": raw_s, "export_vs_raw_consume": (total / export_s) / (read / raw_s),
    }  # fmt: skip
