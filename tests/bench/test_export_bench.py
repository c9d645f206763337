"""Export: the real `flowtrail export` command run on a ledger backlog in its own process — its events/s against a
raw consume of the same topic, and its peak resident memory (the issue: 1M events under 300 MB RSS).

The command is the installed `flowtrail` entry point next to this interpreter (the venv's), so the figures include
what a user pays: the interpreter start, the imports, the ledger reader, the fold and the Parquet writer.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import TopicPartition

from services.common.kafka import follower, topic_partitions
from tests.bench.ceilings import KafkaCeiling
from tests.bench.loaders import bench_sandbox, produce_history
from tests.bench.procstat import rss_mb
from tests.bench.report import Report, Target
from tests.bench.scale import Scale
from tests.conftest import Infra
from tests.factories import run_events

FLOWTRAIL = Path(sys.executable).parent / "flowtrail"
MB300 = Target("<=", 300, unit="MB")


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


# The kernel counts a child's peak RSS (ru_maxrss) from the process it was forked from, and keeps it across exec: a
# command forked from pytest, hundreds of MB after writing the history, would report pytest's size. This small
# interpreter (about 10 MB) spawns the command instead, reaps it with wait4(2), and writes to the file named first
# the command's pid, then its exit code and ru_maxrss (KiB).
_WAITER = """
import os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(argv[0], argv, os.environ)
with open(report, "w") as f:
    f.write(f"{pid}\\n")
_, status, usage = os.wait4(pid, 0)
with open(report, "a") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}\\n")
"""


@dataclass
class Process:
    """One command's exit code, output, wall time, peak RSS (the kernel's ru_maxrss of that process alone) and its
    RSS sampled every `interval` seconds while it ran."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float
    samples_mb: list[float] = field(default_factory=list)


async def run_measured(argv: list[str], env: dict[str, str], *, timeout_s: float, interval: float = 0.2) -> Process:
    """Runs `argv` (its first item a path) under the waiter above, sampling its RSS while it runs."""
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        report = Path(folder) / "report"
        started = time.perf_counter()
        waiter = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", _WAITER, str(report), *argv],
                                         env=env, stdout=out, stderr=err)  # fmt: skip
        done = asyncio.ensure_future(asyncio.to_thread(waiter.wait))
        samples: list[float] = []
        pid = None
        while not done.done():
            if pid is None and report.exists() and (lines := report.read_text().splitlines()):
                pid = int(lines[0])
            if pid is not None and (rss := rss_mb(pid)):  # none after it exits
                samples.append(rss)
            await asyncio.wait([done], timeout=interval)
            if time.perf_counter() - started > timeout_s and pid is not None and not done.done():
                os.kill(pid, signal.SIGKILL)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        assert done.result() == 0, f"the waiter failed: {stderr[-2000:]}"
        _, outcome = report.read_text().splitlines()
        code, max_kib = (int(x) for x in outcome.split())
        return Process(code, stdout, stderr, seconds, max_kib / 1024, samples)


async def test_export_rate_and_memory_against_raw_consume(
    infra: Infra, scale: Scale, report: Report, tmp_path: Path, kafka_ceiling: KafkaCeiling
) -> None:
    template = run_events("run_template", steps=scale.steps)
    runs = math.ceil(scale.export_events / len(template))
    total = runs * len(template)
    async with bench_sandbox(infra, scale.partitions) as box:
        await produce_history(infra.kafka_bootstrap, box.topics.ledger, box.partitions, template, runs)
        read, raw_s = await _raw_consume(infra.kafka_bootstrap, box.topics.ledger)
        out = tmp_path / "out"
        done = await run_measured([str(FLOWTRAIL), "export", str(out)], {**os.environ, **box.env()},
                                  timeout_s=scale.timeout_s)  # fmt: skip
    assert read == total
    assert done.returncode == 0, done.stderr[-2000:]
    counts = dict(pair.split("=") for pair in done.stdout.split("→")[0].split())
    assert counts == {"events": str(total), "runs": str(runs), "steps": str(runs * scale.steps),
                      "attempts": str(runs * scale.steps)}, done.stdout  # fmt: skip
    assert "records (100%)" in done.stderr, "the progress reached the end"
    assert {p.name for p in out.iterdir()} == {f"{t}.parquet" for t in ("events", "runs", "steps", "attempts")}
    raw_rate, export_rate = read / raw_s, total / done.seconds
    thirds = [round(done.samples_mb[len(done.samples_mb) * k // 3]) for k in range(3)] if done.samples_mb else []
    print(f"\nflowtrail export of {total:,} events ({runs:,} runs): {done.seconds:.1f} s, {export_rate:,.0f} events/s "
          f"({export_rate / raw_rate:.3f} of a raw consume at {raw_rate:,.0f}/s); peak RSS {done.peak_mb:.0f} MB, "
          f"sampled at the thirds {thirds} MB")  # fmt: skip
    report.add("throughput", f"raw consume of the same ledger, {total:,} events", raw_rate, "events/s",
               ceiling="kafka.consume")  # fmt: skip
    report.add("throughput", f"flowtrail export (its own process) to Parquet events/s, {total:,} events",
               export_rate, "events/s", ceiling="kafka.consume",
               note=f"{export_rate / raw_rate:.2f}x the raw consume above; start and imports included")  # fmt: skip
    report.add("memory", f"flowtrail export peak RSS (ru_maxrss), {total:,} events", done.peak_mb, "MB",
               target=MB300, note=f"RSS at the thirds of the run {thirds} MB")  # fmt: skip
    report.details["export"] = {
        "events": total, "runs": runs, "steps_per_run": scale.steps, "rows": counts, "export_seconds": done.seconds,
        "raw_consume_seconds": raw_s, "export_vs_raw_consume": export_rate / raw_rate, "peak_rss_mb": done.peak_mb,
        "rss_samples_mb": done.samples_mb[:: max(1, len(done.samples_mb) // 50)], "command": "flowtrail export OUT",
    }  # fmt: skip
    # The bound, at any size: the export streams, so its memory does not follow the history.
    assert done.peak_mb < 300, f"flowtrail export peaked at {done.peak_mb:.0f} MB RSS over {total:,} events"
