"""Render the kustomizations in deploy/kubernetes without a kustomize binary.

Supports exactly what those kustomizations use (resources, namespace, images,
JSON 6902 patches with a kind/name target) and refuses anything else, so a new
kustomize feature in deploy/ fails loudly here instead of being skipped. When
kubectl is installed, tests compare this rendering with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Kinds kustomize leaves without a namespace (the ones deploy/ can contain).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


class UnsupportedKustomization(Exception):
    pass


def render(directory: Path) -> list[Resource]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: fields {sorted(unknown)} not supported")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    if namespace := kustomization.get("namespace"):
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = namespace
    for image in kustomization.get("images", []):
        for resource in resources:
            _set_image(resource, image)
    for patch in kustomization.get("patches", []):
        _apply_patch(resources, patch, directory)
    return resources


def _containers(resource: Resource) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def _set_image(resource: Resource, image: dict[str, str]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise UnsupportedKustomization(f"images fields {sorted(unknown)} not supported")
    for container in _containers(resource):
        name, _, tag = container["image"].partition(":")
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        else:
            tag = image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name


def _apply_patch(resources: list[Resource], patch: dict[str, Any], directory: Path) -> None:
    unknown = set(patch) - {"target", "patch", "path"}
    if unknown:
        raise UnsupportedKustomization(f"patch fields {sorted(unknown)} not supported")
    target = patch.get("target") or {}
    if set(target) - {"kind", "name"} or not target:
        raise UnsupportedKustomization("a patch target must name exactly a kind and a name")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise UnsupportedKustomization("only JSON 6902 patches (a list of operations) are supported")
    matched = [
        r
        for r in resources
        if r["kind"] == target.get("kind", r["kind"])
        and r["metadata"]["name"] == target.get("name", r["metadata"]["name"])
    ]
    if not matched:
        raise UnsupportedKustomization(f"patch target {target} matches no resource")
    for resource in matched:
        for operation in operations:
            _json_patch(resource, operation)


def _json_patch(document: Resource, operation: dict[str, Any]) -> None:
    op = operation["op"]
    if op not in {"add", "remove", "replace"}:
        raise UnsupportedKustomization(f"JSON patch op {op!r} not supported")
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        if op == "add":
            node.insert(len(node) if last == "-" else int(last), value)
        elif op == "remove":
            del node[int(last)]
        else:
            node[int(last)] = value
    elif op == "remove":
        del node[last]
    elif op == "replace" and last not in node:
        raise KeyError(f"replace of missing path {operation['path']}")
    else:
        node[last] = value
