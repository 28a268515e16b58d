"""What the deployment files tell latentd must be something latentd reads:
every LATENTD_* variable they set is a field of the settings class of the
process it is given to (and its value passes that class's validation), and
every probe and scrape path they name answers in the real app."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from app.config import ApiSettings
from tests.deploy.conftest import (
    API_PORT,
    COMPOSE_BASE,
    COMPOSE_OVERRIDES,
    ROOT,
    compose_variables,
    container_env,
    interpolate,
    load_compose,
    pod_containers,
)
from tests.deploy.test_dockerfile import stage_env
from worker.config import WorkerSettings

PREFIX = "LATENTD_"
SETTINGS: dict[str, type[BaseSettings]] = {"api": ApiSettings, "worker": WorkerSettings}
ENV_EXAMPLE = ROOT / ".env.example"
# Variables of Docker Compose itself, read from .env without being interpolated.
COMPOSE_OWN = {"COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}


def env_names(settings: type[BaseSettings]) -> set[str]:
    return {PREFIX + name.upper() for name in settings.model_fields}


def compose_kind(service: str) -> str | None:
    if service == "api":
        return "api"
    if service.startswith("worker"):
        return "worker"
    return None


def environments(
    rendered: dict[str, list[dict[str, Any]]],
) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(where, process kind, environment) for every place that sets variables for a latentd process."""
    for stage in ("api", "worker"):
        yield f"Dockerfile stage {stage}", stage, stage_env(stage)
    for path in [COMPOSE_BASE, *COMPOSE_OVERRIDES]:
        for service, definition in interpolate(load_compose(path))["services"].items():
            yield f"{path.name} service {service}", compose_kind(service), definition.get("environment", {})
    for overlay, resources in rendered.items():
        for workload, container in pod_containers(resources):
            kind = workload["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            where = f"{overlay} {workload['kind']}/{workload['metadata']['name']}"
            yield where, kind if kind in SETTINGS else None, container_env(resources, container)


def test_every_latentd_variable_is_a_setting_of_its_process(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = 0
    for where, kind, env in environments(rendered):
        ours = {k: v for k, v in env.items() if k.upper().startswith(PREFIX)}
        if not ours:
            continue
        assert kind, f"{where} sets {sorted(ours)} but runs no latentd process"
        unknown = set(ours) - env_names(SETTINGS[kind])
        assert not unknown, f"{where}: {sorted(unknown)} are not read by {SETTINGS[kind].__name__}"
        # The values must also pass the settings' own validation.
        for name in list(os.environ):
            if name.upper().startswith(PREFIX):
                monkeypatch.delenv(name)
        for name, value in ours.items():
            if value is not None:  # from a Secret: its value is not in the repository
                monkeypatch.setenv(name, str(value))
        SETTINGS[kind]()
        seen += 1
    assert seen >= 6


def env_example() -> dict[str, str]:
    """Every variable .env.example sets or shows commented out."""
    found = re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    return dict(found)


def test_env_example_sets_only_variables_the_compose_files_use() -> None:
    used = set().union(*(compose_variables(p.read_text()) for p in [COMPOSE_BASE, *COMPOSE_OVERRIDES]))
    every_setting = env_names(ApiSettings) | env_names(WorkerSettings)
    for name in env_example():
        if name in COMPOSE_OWN:
            continue
        assert name in used, f".env.example sets {name}, which no compose file reads"
        if name.startswith(PREFIX):
            assert name in every_setting, f"{name} is not a latentd setting"


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set().union(*(compose_variables(p.read_text()) for p in [COMPOSE_BASE, *COMPOSE_OVERRIDES]))
    assert used <= set(env_example()), f"undocumented: {sorted(used - set(env_example()))}"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    # Nothing listens on port 1: the app must still start, and say it is not ready.
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def probe_paths(rendered: dict[str, list[dict[str, Any]]]) -> set[str]:
    paths = set()
    for resources in rendered.values():
        for workload, container in pod_containers(resources):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in container.get(probe, {}):
                    paths.add(container[probe]["httpGet"]["path"])
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            if "prometheus.io/path" in annotations:
                paths.add(annotations["prometheus.io/path"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    paths.update(re.findall(r"http://127\.0\.0\.1:%s(/\w+)", dockerfile))
    return paths


def test_probe_paths_exist_in_the_app(client: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    paths = probe_paths(rendered)
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    for path in paths:
        assert client.get(path).status_code != 404, path


def test_readiness_fails_while_redis_is_unreachable(client: Any) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503


def test_probe_ports_are_the_port_the_api_listens_on(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for resources in rendered.values():
        for _, container in pod_containers(resources):
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            env = container_env(resources, container)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container.get(probe, {}).get("httpGet")
                if get:
                    port = ports.get(get["port"], get["port"])
                    assert port == int(env.get("LATENTD_PORT") or ApiSettings.model_fields["port"].default)
                    assert port == API_PORT


def test_dockerfile_ready_file_is_what_the_worker_writes() -> None:
    env = stage_env("worker")
    assert Path(env["LATENTD_READY_FILE"]).is_absolute()
    assert "ready_file" in WorkerSettings.model_fields
