"""The Grafana dashboard and the Prometheus alert rules (deploy/grafana/, deploy/prometheus/, docs/observability.md)
use only metrics the services really export, and both are valid: the rules by Prometheus's own `promtool check
rules` and `promtool test rules`, the dashboard through Grafana's dashboard model (grafana-foundation-sdk).

Every PromQL expression is parsed by promql-parser (Prometheus's parser, ported); the metric names it selects must
be on the /metrics of the four services after a workload that makes them count: runs that succeed and fail, webhook
deliveries that succeed and are retried, executor snapshots written. promtool comes from `make promtool` (a
dependency of `make test`); a missing one fails the test, never skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Infra
from tests.harness import FAST_WEBHOOKS, Env, answer, flow, running, stub_upstream, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "flowtrail.json"
RULES = ROOT / "deploy" / "prometheus" / "flowtrail-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "flowtrail-rules.test.yml"

# Series Prometheus makes itself (a scrape's `up`) or a blackbox exporter's /readyz probe makes: no service exports
# them.
SCRAPE_SERIES = {"up", "probe_success"}
# Exported (declared on /metrics) but with samples only while a kafka-triggered flow exists (docs/kafka-triggers.md),
# which this workload does not create.
DECLARED_ONLY = {"flowtrail_ingest_kafka_trigger_lag"}
# The Grafana variables the dashboard's queries use, replaced by what Grafana would put there before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}


def promtool() -> str:
    local = ROOT / ".state" / "tools" / "bin" / "promtool"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("promtool")
    assert found, "promtool is not installed: run `make promtool` (make test does)"
    return found


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    for name, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(name, value) for e in exprs]
    assert not [e for e in exprs if "$" in e], "a Grafana variable the test does not know"
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, from promql-parser's syntax tree (a parse error fails)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            assert name, f"a selector without a metric name in {expr}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def used_names() -> set[str]:
    return {n for e in dashboard_exprs() + rule_exprs() for n in metric_names(e)}


def exported(text: str) -> tuple[set[str], set[str]]:
    """(names declared on a /metrics page, names with at least one sample), as a PromQL query names them."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared |= {family.name + s for s in suffixes.get(family.type, ("",))}
        sampled |= {s.name for s in family.samples}
    return declared, sampled


# ---------------------------------------------------------------- the files alone


def test_expressions_parse_and_name_only_flowtrail_or_scrape_series() -> None:
    names = used_names()
    assert names, "no metric names found"
    assert {n for n in names if not n.startswith("flowtrail_")} == SCRAPE_SERIES
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        metric_names("sum(rate(flowtrail_ingest_triggers_total[5m])")


def test_promtool_checks_the_rules_and_their_unit_tests() -> None:
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in check.stdout, check.stdout
    # promtool test rules: the alerts fire (and stay quiet) on the series the rule tests feed them.
    tested = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=RULE_TESTS.parent)  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: sum(rate(x[5m])\n")
    check = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert check.returncode != 0


def test_every_rule_says_what_it_means_and_what_to_do() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_the_dashboard_fits_grafanas_dashboard_model() -> None:
    raw = dashboard()
    plugins.register_default_plugins()
    model = Dashboard.from_json(raw)
    back = json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json()))

    def lost(a: Any, b: Any, path: str = "") -> Iterator[str]:
        """Paths of `a` that Grafana's model dropped or changed (it may add its defaults)."""
        if isinstance(a, dict) and isinstance(b, dict):
            for k, v in a.items():
                yield from (lost(v, b[k], f"{path}/{k}") if k in b else [f"{path}/{k} dropped"])
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                yield from lost(x, y, f"{path}[{i}]")
        elif a != b:
            yield f"{path}: {a!r} became {b!r}"

    assert list(lost(raw, back)) == []
    assert model.title == "Flowtrail" and model.uid == "flowtrail-overview"
    panels = raw["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for wanted in ("triggers", "runs finished", "latency", "lag", "batch", "webhook", "route", "replay", "snapshot"):
        assert wanted in titles, wanted


# ---------------------------------------------------------------- against the running services


def _flows(upstream: str) -> list[Any]:
    return [
        flow("tenant-a", "fine", [{"name": "shape", "action": "transform", "input": {"output": {"ok": True}}}]),
        flow("tenant-a", "broken", [
            {"name": "reject", "action": "http_request", "retry": {"delays_s": []},
             "input": {"method": "POST", "url": upstream + "/reject", "body": {}}},
        ]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    routes = {("POST", "/reject"): answer({"error": "no"}, 422), ("POST", "/hooks/ok"): answer({}),
              ("POST", "/hooks/down"): answer({}, 503)}  # fmt: skip
    # Snapshots written every half second once a partition has a new record, so one is written within the test.
    snapshots = {"FLOWTRAIL_EXECUTOR_SNAPSHOT_INTERVAL_S": "0.5", "FLOWTRAIL_EXECUTOR_SNAPSHOT_MIN_EVENTS": "1"}
    settings = {**FAST_WEBHOOKS, **snapshots, "FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS": "true"}
    async with stub_upstream(routes) as up, running(
        infra, tmp_path_factory, flows=_flows(up.url), env=settings, upstream=up
    ) as env:  # fmt: skip
        yield env


async def test_every_metric_the_dashboard_and_rules_use_is_on_the_services_metrics(env: Env) -> None:
    events = ["run.succeeded", "run.failed"]
    for path in ("ok", "down"):
        await env.ok(
            "POST", "/v1/webhooks", status=201, json={"url": f"{env.upstream.url}/hooks/{path}", "events": events}
        )
    runs = [await env.trigger("fine", {"n": i}) for i in range(3)] + [await env.trigger("broken")]
    final = await env.wait_all(runs)
    assert sorted(final.values()) == ["FAILED", "SUCCEEDED", "SUCCEEDED", "SUCCEEDED"]
    await env.ok("GET", "/v1/runs")

    wanted = used_names() - SCRAPE_SERIES
    pages: dict[str, str] = {}

    async def all_counted() -> bool:
        async with httpx.AsyncClient(timeout=10) as client:
            for name in ("ingest", "executor", "projector", "api"):
                r = await client.get(f"{env.url(name)}/metrics")
                assert r.status_code == 200, (name, r.status_code)
                pages[name] = r.text
        sampled = set().union(*(exported(t)[1] for t in pages.values()))
        return wanted - DECLARED_ONLY <= sampled

    # Webhook retries and the first snapshot come a moment after the runs end.
    try:
        await wait_until(all_counted, 60, "every metric counted", every=0.5, logs=env.log_tails)
    except AssertionError:
        sampled = set().union(*(exported(t)[1] for t in pages.values()))
        raise AssertionError(f"no samples on any /metrics for {sorted(wanted - DECLARED_ONLY - sampled)}") from None
    declared = set().union(*(exported(t)[0] for t in pages.values()))
    assert wanted <= declared, sorted(wanted - declared)
    # The outcomes the webhook and snapshot rules watch are the label values the services really write.
    projector = pages["projector"]
    assert 'flowtrail_projector_webhook_deliveries_total{outcome="delivered"}' in projector
    assert 'flowtrail_projector_webhook_deliveries_total{outcome="retrying"}' in projector
    assert 'flowtrail_executor_snapshots_total{outcome="written"}' in pages["executor"]
    assert re.search(r'flowtrail_projector_runs_finished_total\{status="FAILED"\} 1\.0', projector), projector
