"""Benchmark fixtures: the scale, the one report, the raw ceilings (measured once per session, on demand).

`make bench` / `make bench-smoke` run this folder; a plain `pytest` over `tests/` leaves it out unless
the folder is named on the command line or FLOWTRAIL_BENCH_SCALE is set, so `make test` stays fast.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.db import connect
from tests.bench import scale as scales
from tests.bench.ceilings import CopyCeiling, KafkaCeiling, copy_read_models, kafka_produce_then_consume
from tests.bench.loaders import bench_sandbox
from tests.bench.machine import describe
from tests.bench.report import Report
from tests.conftest import STATE_DIR, Infra

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = STATE_DIR / "bench"
REPORT = Report()


def _asked_for(config: pytest.Config) -> bool:
    if os.environ.get(scales.ENV):
        return True
    for arg in config.invocation_params.args:
        path = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if path == BENCH_DIR or BENCH_DIR in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    inside = collection_path == BENCH_DIR or BENCH_DIR in collection_path.parents
    return True if inside and not _asked_for(config) else None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT.figures:
        return
    terminalreporter.write_sep("=", "Flowtrail benchmark")
    terminalreporter.write_line(REPORT.render())
    path = REPORT.write(OUT_DIR)
    terminalreporter.write_line(f"\nwritten to {path} (with machine, versions and per-stage details)")


@pytest.fixture(scope="session")
def scale() -> scales.Scale:
    return scales.current()


@pytest.fixture(scope="session")
async def report(infra: Infra, scale: scales.Scale) -> Report:
    if not REPORT.machine:
        REPORT.scale = scale.as_dict()
        REPORT.machine = await describe(infra.kafka_bootstrap, infra.database_url)
    return REPORT


@pytest.fixture(scope="session")
def run_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


@pytest.fixture(scope="module")
def log_dir(request: pytest.FixtureRequest, run_stamp: str) -> Path:
    """Service logs of this run, one folder per module, kept for digging into a figure afterwards."""
    path = OUT_DIR / "logs" / run_stamp / request.module.__name__.rsplit(".", 1)[-1]
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
async def kafka_ceiling(infra: Infra, scale: scales.Scale, report: Report) -> KafkaCeiling:
    c = await kafka_produce_then_consume(infra.kafka_bootstrap, scale.kafka_messages, scale.record_bytes,
                                         scale.partitions)  # fmt: skip
    size = f"{c.record_bytes} B"
    report.add_ceiling("kafka.round_trip", f"raw Kafka produce→consume, {size}", c.round_trip_rate, "msg/s")
    report.add_ceiling("kafka.produce", f"raw Kafka produce, {size}", c.produce_rate, "msg/s")
    report.add_ceiling("kafka.consume", f"raw Kafka consume, {size}", c.consume_rate, "msg/s")
    report.details["kafka_ceiling"] = {
        "messages": c.messages, "record_bytes": c.record_bytes, "produce_s": c.produce_s,
        "consume_s": c.consume_s, "producer": c.settings,
    }  # fmt: skip
    return c


@pytest.fixture(scope="session")
async def copy_ceiling(infra: Infra, scale: scales.Scale, report: Report) -> CopyCeiling:
    async with bench_sandbox(infra, partitions=1) as box:
        conn = await connect(infra.database_url, box.schema)
        try:
            c = await copy_read_models(conn, box.schema, scale.copy_runs, scale.steps)
        finally:
            await conn.close()
    report.add_ceiling("copy.mix", "raw COPY, read-model mix", c.mixed_rate, "rows/s")
    for table in c.rows:
        report.add_ceiling(f"copy.{table}", f"raw COPY {table}", c.rate(table), "rows/s")
    report.details["copy_ceiling"] = {"rows": c.rows, "seconds": c.seconds, "steps_per_run": scale.steps}
    return c
