"""The Kubernetes manifests (deploy/kubernetes/, docs/kubernetes.md) render with the real kustomize and every object
is valid against the Kubernetes API schemas that kubernetes-validate carries offline; the rendered workloads keep
what docs/kubernetes.md promises: probes, requests, settings and secrets wired, instance ids, replicas within the
partition count.

kustomize comes from `make kustomize` (a dependency of `make test`); a missing one fails the test, never skips it.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"
SERVICES = ("api", "ingest", "executor", "projector")
PORTS = {"api": 8700, "ingest": 8701, "executor": 8702, "projector": 8703}


def kustomize_binary() -> str:
    """The kustomize `make kustomize` installed under .state/tools/bin, or one on PATH."""
    local = ROOT / ".state" / "tools" / "bin" / "kustomize"
    found = str(local) if os.access(local, os.X_OK) else shutil.which("kustomize")
    assert found, "kustomize is not installed: run `make kustomize` (make test does)"
    return found


def build(target: str) -> list[dict[str, Any]]:
    """`kustomize build deploy/kubernetes/<target>`, parsed."""
    out = subprocess.run([kustomize_binary(), "build", str(KUSTOMIZE_DIR / target)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return build(request.param)


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return build("overlays/example")


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workload(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    name = f"flowtrail-{service}"
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} workloads"
    return found[0]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted({d["kind"] for d in rendered})
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service"} <= set(kinds), kinds
    for doc in rendered:
        # Strict: an unknown or misspelt field is an error, as the API server's strict field validation makes it.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_workload(example: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(workload(example, "api"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = 8700
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    misspelt = copy.deepcopy(workload(example, "api"))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)


def test_each_service_has_probes_requests_settings_and_secrets(rendered: list[dict[str, Any]]) -> None:
    config_maps = by_kind(rendered, "ConfigMap")
    assert len(config_maps) == 1
    settings_name, settings = next(iter(config_maps.items()))
    for service in SERVICES:
        c = container(workload(rendered, service))
        assert c["command"] == ["python", "-m", f"services.{service}"]
        assert c["ports"] == [{"name": "http", "containerPort": PORTS[service]}]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["resources"]
        assert c["envFrom"] == [{"configMapRef": {"name": settings_name}}]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if "secretKeyRef" in
                   e.get("valueFrom", {})}  # fmt: skip
        assert secrets["FLOWTRAIL_DATABASE_URL"] == "database-url"
        assert secrets["FLOWTRAIL_SECRETS_KEY"] == "secrets-key"
        assert ("FLOWTRAIL_API_OPERATOR_KEY" in secrets) == (service == "api")
        # Each service listens on every address of its pod, at the port its probes and Service use.
        prefix = {"executor": "EXECUTOR_WEB", "projector": "PROJECTOR_HTTP"}.get(service, service.upper())
        assert settings["data"][f"FLOWTRAIL_{prefix}_HOST"] == "0.0.0.0"
        assert settings["data"][f"FLOWTRAIL_{prefix}_PORT"] == str(PORTS[service])
    assert "password" not in str(settings["data"]).lower()
    assert "FLOWTRAIL_DATABASE_URL" not in settings["data"]


def test_executors_and_projectors_are_stateful_sets_named_by_pod_within_the_partitions(
    rendered: list[dict[str, Any]],
) -> None:
    settings = next(iter(by_kind(rendered, "ConfigMap").values()))["data"]
    partitions = int(settings["FLOWTRAIL_PARTITIONS"])
    for service in ("executor", "projector"):
        doc = workload(rendered, service)
        assert doc["kind"] == "StatefulSet"
        assert 1 <= doc["spec"]["replicas"] <= partitions
        env = {e["name"]: e for e in container(doc)["env"]}
        instance = env[f"FLOWTRAIL_{service.upper()}_INSTANCE_ID"]
        assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert by_kind(rendered, "Service")[doc["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    for service in ("api", "ingest"):
        assert workload(rendered, service)["kind"] == "Deployment"


def test_api_and_ingest_are_behind_services_and_kafka_postgres_are_external(rendered: list[dict[str, Any]]) -> None:
    services = by_kind(rendered, "Service")
    for service in ("api", "ingest"):
        svc = services[f"flowtrail-{service}"]["spec"]
        pods = workload(rendered, service)["spec"]["template"]["metadata"]["labels"]
        assert svc["selector"].items() <= pods.items()
        assert svc["ports"] == [{"name": "http", "port": PORTS[service], "targetPort": "http"}]
    for name in ("flowtrail-kafka", "flowtrail-postgres"):
        assert services[name]["spec"]["type"] == "ExternalName"
    settings = next(iter(by_kind(rendered, "ConfigMap").values()))["data"]
    assert settings["FLOWTRAIL_KAFKA_BOOTSTRAP"] == "flowtrail-kafka:9092"


def test_the_example_overlay_supplies_every_secret_and_points_at_its_own_hosts(example: list[dict[str, Any]]) -> None:
    (secret,) = by_kind(example, "Secret").values()
    env = [e for s in SERVICES for e in container(workload(example, s))["env"]]
    referenced = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert referenced == {secret["metadata"]["name"]}
    assert set(secret["data"]) == {"database-url", "secrets-key", "operator-key"}
    assert {d["metadata"].get("namespace") for d in example if d["kind"] != "Namespace"} == {"flowtrail"}
    settings = next(iter(by_kind(example, "ConfigMap").values()))["data"]
    assert settings["FLOWTRAIL_PARTITIONS"] == "12"
    assert workload(example, "executor")["spec"]["replicas"] == 4
    assert container(workload(example, "api"))["image"] == "registry.example.com/flowtrail:0.1.0"
    services = by_kind(example, "Service")
    assert services["flowtrail-kafka"]["spec"]["externalName"] == "my-cluster-kafka-bootstrap.kafka.svc.cluster.local"
