"""deploy/kubernetes: every overlay rendered, each resource validated against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
fail) and KEDA's ScaledObject against tests/deploy/schemas, then the wiring
between resources that no schema sees: selectors, probes, queue names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import (
    API_PORT,
    KUBERNETES,
    OVERLAYS,
    container_env,
    find,
    find_tool,
    pod_containers,
    render_overlay,
)

# The oldest Kubernetes release the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda-scaledobject.json"}

Resources = list[dict[str, Any]]


def test_every_overlay_is_found() -> None:
    assert {o.name for o in OVERLAYS} == {"bundled-redis", "managed-redis"}


def _key(resource: dict[str, Any]) -> tuple[str, str, str]:
    return resource["kind"], resource["metadata"].get("namespace", ""), resource["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_python_rendering_matches_kubectl_kustomize(overlay: Path) -> None:
    """The tests read our own rendering; where kubectl is installed, it must equal kustomize's."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed: the rendering is checked against kustomize only where it is")
    result = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {_key(r): r for r in yaml.safe_load_all(result.stdout) if r}
    ours = {_key(r): r for r in render_overlay(overlay)}
    assert sorted(theirs) == sorted(ours)
    for key, resource in ours.items():
        assert json.dumps(resource, sort_keys=True) == json.dumps(theirs[key], sort_keys=True), key


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_resources_match_their_schemas(overlay: Path, version: str, rendered: dict[str, Resources]) -> None:
    import kubernetes_validate

    failures = []
    for resource in rendered[overlay.name]:
        custom = CUSTOM_SCHEMAS.get((resource["apiVersion"], resource["kind"]))
        try:
            if custom:
                schema = json.loads(custom.read_text())
                jsonschema.validators.validator_for(schema)(schema).validate(resource)
            else:
                kubernetes_validate.validate(resource, version, strict=True)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            failures.append(f"{resource['kind']}/{resource['metadata']['name']}: {error}")
    assert not failures, "\n".join(failures)


def test_kubernetes_validate_cli_accepts_the_rendered_files(
    tmp_path: Path, rendered: dict[str, Resources]
) -> None:
    """The same check through the command CI users would type, on the rendered YAML."""
    cli = find_tool("kubernetes-validate")
    files = []
    for name, resources in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all([r for r in resources if r["kind"] != "ScaledObject"]))
        files.append(str(path))
    result = subprocess.run([cli, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
        if expression["operator"] == "Exists" and not present:
            return False
    return True


def _pod_labels(resources: Resources) -> dict[str, dict[str, str]]:
    return {
        r["metadata"]["name"]: r["spec"]["template"]["metadata"]["labels"]
        for r in resources
        if "template" in r.get("spec", {})
    }


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_selectors_match_their_pods(overlay: Path, rendered: dict[str, Resources]) -> None:
    resources = rendered[overlay.name]
    pods = _pod_labels(resources)
    for resource in resources:
        kind, name = resource["kind"], resource["metadata"]["name"]
        if kind in {"Deployment", "StatefulSet"}:
            assert _selects(resource["spec"]["selector"], pods[name]), name
        elif kind == "PodDisruptionBudget":
            assert [w for w, labels in pods.items() if _selects(resource["spec"]["selector"], labels)], name
        elif kind == "Service":
            matched = [
                w
                for w, labels in pods.items()
                if _selects({"matchLabels": resource["spec"]["selector"]}, labels)
            ]
            assert len(matched) == 1, (name, matched)
            (workload,) = matched
            ports = {
                p["name"]
                for _, c in pod_containers([find(resources, _workload_kind(resources, workload), workload)])
                for p in c.get("ports", [])
            }
            for port in resource["spec"]["ports"]:
                assert port["targetPort"] in ports, (name, port)


def _workload_kind(resources: Resources, name: str) -> str:
    return next(
        r["kind"] for r in resources if r["metadata"]["name"] == name and "template" in r.get("spec", {})
    )


def test_redis_network_policy_admits_only_api_worker_and_keda(rendered: dict[str, Resources]) -> None:
    resources = rendered["bundled-redis"]
    policy = find(resources, "NetworkPolicy", "redis")
    pods = _pod_labels(resources)
    assert _selects(policy["spec"]["podSelector"], pods["redis"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    pod_rules = [peer["podSelector"] for peer in rule["from"] if "podSelector" in peer]
    admitted = {name for name, labels in pods.items() if any(_selects(s, labels) for s in pod_rules)}
    assert admitted == {"latentd-api", "latentd-worker"}
    outsider = {"app.kubernetes.io/name": "something-else", "app.kubernetes.io/component": "api"}
    assert not any(_selects(s, outsider) for s in pod_rules)
    namespaces = [peer["namespaceSelector"] for peer in rule["from"] if "namespaceSelector" in peer]
    assert namespaces == [{"matchLabels": {"kubernetes.io/metadata.name": "keda"}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_redis_is_durable_and_never_evicts(rendered: dict[str, Resources]) -> None:
    resources = rendered["bundled-redis"]
    conf = find(resources, "ConfigMap", "redis-config")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.MULTILINE)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.MULTILINE)
    data_dir = re.search(r"^dir (\S+)$", conf, re.MULTILINE)
    redis = find(resources, "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert data_dir
    assert mounts["data"] == data_dir.group(1)
    assert "data" in claims
    assert container["command"][-1].startswith(mounts["config"])


def test_worker_requests_a_gpu_and_drains_before_it_is_killed(rendered: dict[str, Resources]) -> None:
    for resources in rendered.values():
        worker = find(resources, "Deployment", "latentd-worker")
        spec = worker["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        api = find(resources, "Deployment", "latentd-api")
        (api_container,) = api["spec"]["template"]["spec"]["containers"]
        job_timeout = int(container_env(resources, api_container)["LATENTD_JOB_TIMEOUT"] or 0)
        # The kubelet waits longer than the worker's own SIGTERM grace, which lasts a whole job.
        shutdown_grace = float(container_env(resources, container)["LATENTD_SHUTDOWN_GRACE"] or 0)
        assert spec["terminationGracePeriodSeconds"] > shutdown_grace >= job_timeout > 0


def test_redis_is_ready_on_pong_and_alive_on_any_answer() -> None:
    # redis-cli exits 0 on an error reply: ready on PONG (not LOADING); a liveness probe that wanted
    # PONG would kill a Redis loading a large AOF.
    redis = yaml.safe_load_all((KUBERNETES / "redis" / "redis.yaml").read_text())
    (statefulset,) = (r for r in redis if r and r["kind"] == "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["exec"]["command"] == ["sh", "-c", "redis-cli ping | grep -q PONG"]
    assert container["livenessProbe"]["exec"]["command"] == ["redis-cli", "ping"]


def test_worker_readiness_is_the_ready_file(rendered: dict[str, Resources]) -> None:
    for resources in rendered.values():
        worker = find(resources, "Deployment", "latentd-worker")
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        ready_file = container_env(resources, container)["LATENTD_READY_FILE"]
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"] == ["test", "-f", ready_file], probe
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(ready_file.startswith(m + "/") for m in mounts), (
            "the ready file must be on a writable volume"
        )


def test_scaled_object_watches_the_workers_queue(rendered: dict[str, Resources]) -> None:
    from rq import Queue

    from latentd.contract import Keys

    for name, resources in rendered.items():
        scaled = find(resources, "ScaledObject", "latentd-worker")
        target = find(resources, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        (container,) = target["spec"]["template"]["spec"]["containers"]
        model = container_env(resources, container)["LATENTD_MODEL_NAME"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == Queue.redis_queue_namespace_prefix + Keys.queue_name(
            model
        ), name
        assert scaled["spec"]["minReplicaCount"] >= 1, "the API refuses models with no live worker"
        # KEDA owns the count: one in the manifest would shrink the pool to it on every apply.
        assert "replicas" not in target["spec"], name
        if name == "bundled-redis":
            namespace = target["metadata"]["namespace"]
            assert trigger["metadata"]["address"] == f"redis.{namespace}.svc.cluster.local:6379"
        else:
            env = {e["name"] for e in container["env"]}
            assert {trigger["metadata"]["addressFromEnv"], trigger["metadata"]["passwordFromEnv"]} <= env


def test_redis_url_points_at_the_redis_service(rendered: dict[str, Resources]) -> None:
    resources = rendered["bundled-redis"]
    url = find(resources, "ConfigMap", "latentd-config")["data"]["LATENTD_REDIS_URL"]
    service = find(resources, "Service", "redis")
    (port,) = service["spec"]["ports"]
    assert url.startswith(f"redis://{service['metadata']['name']}:{port['port']}/")


def test_managed_redis_takes_the_url_from_a_secret(rendered: dict[str, Resources]) -> None:
    resources = rendered["managed-redis"]
    assert not [r for r in resources if r["kind"] in {"StatefulSet", "NetworkPolicy"}]
    assert "LATENTD_REDIS_URL" not in find(resources, "ConfigMap", "latentd-config")["data"]
    for _, container in pod_containers(resources):
        (url,) = [e for e in container["env"] if e["name"] == "LATENTD_REDIS_URL"]
        assert url["valueFrom"]["secretKeyRef"]["name"] == "latentd-redis"


def test_api_scrape_annotations_name_the_metrics_endpoint(rendered: dict[str, Resources]) -> None:
    for resources in rendered.values():
        api = find(resources, "Deployment", "latentd-api")
        annotations = api["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(API_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"


def test_kustomizations_parse_as_yaml() -> None:
    for path in KUBERNETES.rglob("*.yaml"):
        list(yaml.safe_load_all(path.read_text()))
