"""Shared loading for the deployment checks: the compose files, the rendered
Kubernetes overlays and the external linters (hadolint, docker-compose) that
PyPI ships as binaries. Nothing here needs a Docker engine, a cluster or the
network."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import kustomize_lite

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPOSE_BASE = ROOT / "docker-compose.yml"
COMPOSE_OVERRIDES = [ROOT / "docker-compose.cpu.yml", ROOT / "docker-compose.multi-gpu.yml"]

API_PORT = 8000


def find_tool(name: str) -> str:
    """A tool's path: next to this interpreter (the venv) or on PATH.

    Missing locally is a skip that says how to get it; missing in CI (CI=true)
    is a failure, so a CI run can never pass by skipping the linters.
    """
    path = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if path:
        return path
    message = f"{name} not found: pip install -e '.[dev]'"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that keeps Compose's merge tags (!reset, !override) as plain values."""


def _tagged(loader: ComposeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(data, dict), path
    return data


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^${}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose-style ${VAR}, ${VAR:-default}, nested defaults, with `env` (default: none set)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    env = env or {}
    previous = None
    while previous != value:
        previous = value
        value = _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    return value


def compose_variables(text: str) -> set[str]:
    """Every variable a compose file interpolates."""
    return set(re.findall(r"\$\{(\w+)", text))


def render_overlay(path: Path) -> list[dict[str, Any]]:
    return kustomize_lite.render(path)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay rendered, by overlay name."""
    return {overlay.name: render_overlay(overlay) for overlay in OVERLAYS}


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    raise AssertionError(f"no {kind}/{name}")


def pod_containers(resources: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every pod template."""
    for resource in resources:
        template = resource.get("spec", {}).get("template")
        if template:
            for container in template["spec"].get("containers", []):
                yield resource, container


def container_env(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str | None]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then env.

    A value taken from a Secret is None (its value is not in the repository).
    """
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom {source}"
        env.update(find(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env
