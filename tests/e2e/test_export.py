"""`flowtrail export` (deploy/launcher/export_cmd.py, docs/ledger.md#export) of runs made by the real services, read
back with pyarrow and compared with the API; and its memory while exporting ~200,000 events."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from deploy.launcher.export_files import export
from schemas.flows import FlowDefinition
from tests.bench.loaders import bench_sandbox, produce_history
from tests.bench.procstat import rss_mb
from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import Env, answer, first_calls, flow, running, stub_upstream

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "analytics" / "flow_stats.py"


async def _sometimes(request: web.Request) -> web.Response:
    """Refuses odd numbers: a step that passes and fails on one flow version (a flaky step)."""
    if int(request.match_info["n"]) % 2:
        return web.json_response({"error": "odd"}, status=422)
    return web.json_response({"ok": True})


ROUTES = {
    ("GET", "/flaky/{n}"): first_calls(1, answer({"busy": True}, 503), answer({"ok": True})),
    ("GET", "/sometimes/{n}"): _sometimes,
    ("GET", "/bad"): answer({"error": "rejected"}, 422),
}


def _flows(upstream: str) -> list[FlowDefinition]:
    shape = {"name": "shape", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}"}}}
    return [
        flow("tenant-a", "ok", [shape, {**shape, "name": "again"}]),
        flow("tenant-a", "flaky", [{"name": "call", "action": "http_request", "retry": {"delays_s": [1]},
                                    "input": {"method": "GET", "url": upstream + "/flaky/{{ trigger.n }}"}}]),
        flow("tenant-a", "bad", [shape, {"name": "call", "action": "http_request", "retry": {"delays_s": []},
                                         "input": {"method": "GET", "url": upstream + "/bad"}}]),
        flow("tenant-a", "mixed", [{"name": "call", "action": "http_request", "retry": {"delays_s": []},
                                    "input": {"method": "GET", "url": upstream + "/sometimes/{{ trigger.n }}"}}]),
        flow("tenant-b", "ok", [shape]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with stub_upstream(ROUTES) as up, running(
        infra, tmp_path_factory, keys={"a": "tenant-a", "b": "tenant-b"}, flows=_flows(up.url),
        env={"FLOWTRAIL_EXECUTOR_TIME_SCALE": "0.01"}, upstream=up,
    ) as env:  # fmt: skip
        yield env


@pytest.fixture(scope="module")
async def history(env: Env) -> dict[str, list[str]]:
    """Runs of each tenant-a flow (and two of tenant-b), all ended."""
    runs = {
        "ok": [await env.trigger("ok", {"n": i}) for i in range(4)],
        "flaky": [await env.trigger("flaky", {"n": i}) for i in range(3)],
        "bad": [await env.trigger("bad", {"n": i}) for i in range(2)],
        "mixed": [await env.trigger("mixed", {"n": i}) for i in range(4)],
        "b": [await env.trigger("ok", {"n": i}, key="b") for i in range(2)],
    }
    await env.wait_all([r for k, ids in runs.items() if k != "b" for r in ids], within=120)
    await env.wait_all(runs["b"], key="b", within=120)
    return runs


def _at(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


async def test_export_of_real_runs_equals_the_api(env: Env, history: dict[str, list[str]], tmp_path: Path) -> None:
    sandbox = env.sandbox
    counts = await export(sandbox.infra.kafka_bootstrap, sandbox.topics, tmp_path, tenant="tenant-a", group_rows=5)
    mine = [r for k, ids in history.items() if k != "b" for r in ids]
    runs = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    steps = pq.read_table(tmp_path / "steps.parquet").to_pylist()
    attempts = pq.read_table(tmp_path / "attempts.parquet").to_pylist()
    events = pq.read_table(tmp_path / "events.parquet").to_pylist()
    assert counts == {"events": len(events), "runs": len(runs), "steps": len(steps), "attempts": len(attempts)}
    assert sorted(r["id"] for r in runs) == sorted(mine), "tenant-a's runs, each once; none of tenant-b's"
    assert pq.ParquetFile(tmp_path / "events.parquet").metadata.num_row_groups > 1, "written a row group at a time"

    events_of = Counter(e["run_id"] for e in events)
    for row in runs:
        api = await env.ok("GET", f"/v1/runs/{row['id']}")
        assert {k: row[k] for k in ("status", "flow_id", "flow_version", "trigger_type", "steps_count",
                                    "failed_step", "duration_ms")} == {
            k: api[k] for k in ("status", "flow_id", "flow_version", "trigger_type", "steps_count", "failed_step",
                                "duration_ms")}  # fmt: skip
        assert (row["started_at"], row["finished_at"]) == (_at(api["started_at"]), _at(api["finished_at"]))
        mine_steps = {s["step"]: s for s in steps if s["run_id"] == row["id"]}
        assert {n: (s["status"], s["attempt"], s["action"]) for n, s in mine_steps.items()} == {
            s["name"]: (s["status"], s["attempt"], s["action"]) for s in api["steps"]}  # fmt: skip
        for s in api["steps"]:
            got = sorted(
                (a["attempt"], a["status"]) for a in attempts if (a["run_id"], a["step"]) == (row["id"], s["name"])
            )
            assert got == sorted((a["attempt"], a["status"]) for a in s["attempts"]), (row["id"], s["name"])
        assert events_of[row["id"]] == len(await env.events(row["id"])), "every event of the run exported"

    by_flow = Counter((r["flow_id"], r["status"]) for r in runs)
    assert by_flow == {("ok", "SUCCEEDED"): 4, ("flaky", "SUCCEEDED"): 3, ("bad", "FAILED"): 2,
                       ("mixed", "SUCCEEDED"): 2, ("mixed", "FAILED"): 2}  # fmt: skip
    flaky_attempts = [a for a in attempts if a["run_id"] in history["flaky"]]
    assert sorted(a["status"] for a in flaky_attempts) == ["FAILED"] * 3 + ["SUCCEEDED"] * 3  # retried once each
    first = next(e for e in events if e["type"] == "RunRequested" and e["run_id"] == history["flaky"][0])
    assert orjson.loads(first["payload"])["trigger"]["payload"] == {"n": 0}


async def test_export_filters_by_flow_and_time(env: Env, history: dict[str, list[str]], tmp_path: Path) -> None:
    sandbox = env.sandbox
    counts = await export(sandbox.infra.kafka_bootstrap, sandbox.topics, tmp_path / "flaky", flow="flaky")
    assert counts["runs"] == 3 and counts["attempts"] == 6
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert await export(sandbox.infra.kafka_bootstrap, sandbox.topics, tmp_path / "none", since=later) == {
        "events": 0, "runs": 0, "steps": 0, "attempts": 0}  # fmt: skip
    long_ago = datetime.now(UTC) - timedelta(days=1)
    counts = await export(sandbox.infra.kafka_bootstrap, sandbox.topics, tmp_path / "old", until=long_ago)
    assert counts["runs"] == 0 and counts["events"] == 0


async def test_the_cli_writes_json_lines_with_progress(env: Env, history: dict[str, list[str]], tmp_path: Path) -> None:
    sandbox = env.sandbox
    out = tmp_path / "jsonl"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "deploy.launcher.cli", "export", str(out), "--tenant", "tenant-b", "--format", "jsonl"],
        env={**os.environ, **sandbox.env()}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "runs=2" in done.stdout
    assert "records (100%)" in done.stderr
    lines = [orjson.loads(line) for line in (out / "runs.jsonl").read_bytes().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(history["b"])
    assert {r["status"] for r in lines} == {"SUCCEEDED"}


async def test_example_analytics_job_equals_the_api(env: Env, history: dict[str, list[str]], tmp_path: Path) -> None:
    """examples/analytics/flow_stats.py over the export: the figures of GET /v1/analytics/flows/{flow_id}."""
    sandbox = env.sandbox
    await export(sandbox.infra.kafka_bootstrap, sandbox.topics, tmp_path, tenant="tenant-a")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(EXAMPLE), str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    stats = out["flows"]
    assert set(stats) == {"ok", "flaky", "bad", "mixed"}
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for flow_id, mine in stats.items():
        api = await env.ok("GET", f"/v1/analytics/flows/{flow_id}", params={"from": since, "bucket": "day"})
        assert (mine["runs"], mine["pass_rate"]) == (api["runs"], api["pass_rate"]), flow_id
        days = [b for b in api["series"] if b["runs"]]
        if len(days) == 1:  # percentiles are per bucket: equal when the runs fall on one UTC day
            for q in ("p50", "p95", "p99"):
                assert mine["duration_ms"][q] == pytest.approx(days[0]["duration_ms"][q]), (flow_id, q)
    assert stats["ok"]["pass_rate"] == 1.0 and stats["bad"]["pass_rate"] == 0.0
    api_flaky = (await env.ok("GET", "/v1/analytics/flakiness"))["data"]
    keys = ("flow_id", "flow_version", "step", "succeeded", "failed", "retried", "score")
    assert [{k: f[k] for k in keys} for f in out["flaky_steps"]] == [{k: f[k] for k in keys} for f in api_flaky]
    assert [(f["flow_id"], f["step"], f["score"]) for f in out["flaky_steps"]] == [("mixed", "call", 1.0)]


async def test_memory_stays_flat_exporting_200k_events(infra: Infra, tmp_path: Path) -> None:
    template = run_events("run_template", steps=3)  # 9 events a run
    runs = 200_000 // len(template) + 1
    async with bench_sandbox(infra, 2) as sandbox:  # its large topics are deleted afterwards
        await produce_history(sandbox.infra.kafka_bootstrap, sandbox.topics.ledger, sandbox.partitions, template, runs)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deploy.launcher.cli", "export", str(tmp_path / "out"),
            env={**os.environ, **sandbox.env()}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        peak, samples, started = 0.0, [], time.monotonic()
        outcome = asyncio.ensure_future(proc.communicate())
        while not outcome.done():
            rss = rss_mb(proc.pid)
            if rss is not None:
                peak = max(peak, rss)
                samples.append(rss)
            await asyncio.wait([outcome], timeout=0.2)
            assert time.monotonic() - started < 600, "export took over 10 minutes"
        out_b, err_b = outcome.result()
        out, err = out_b.decode(), err_b.decode()
        assert proc.returncode == 0, err
        elapsed = time.monotonic() - started
    thirds = [samples[len(samples) * k // 3] for k in range(3)] if samples else []
    print(f"\nexport of {runs * len(template):,} events: peak RSS {peak:.0f} MB (sampled: {thirds}), {elapsed:.1f} s, "
          f"{runs * len(template) / elapsed:,.0f} events/s; {out.strip()}")  # fmt: skip
    assert f"runs={runs}" in out and f"events={runs * len(template)}" in out
    table = pq.read_table(tmp_path / "out" / "runs.parquet", columns=["status"])
    assert table.num_rows == runs
    # Flat: the late samples are no higher than the middle ones by more than a margin, and the peak is small.
    assert peak < 300, f"peak RSS {peak:.0f} MB"
    if len(samples) >= 10:
        middle, late = samples[len(samples) // 3], max(samples[-len(samples) // 3 :])
        assert late < middle + 60, f"RSS grew from {middle:.0f} MB to {late:.0f} MB while exporting"
