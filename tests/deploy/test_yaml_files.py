"""Every YAML file of the deployment parses, with no key given twice.

PyYAML keeps the last of two equal keys without a word; kubectl and Compose
refuse or misread such files, so a duplicated `env` or `command` would pass
every other check here and fail only on a real engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT, ComposeLoader

FILES = sorted(
    [
        *ROOT.glob("docker-compose*.yml"),
        *(ROOT / "deploy").rglob("*.yaml"),
        *(ROOT / "deploy").rglob("*.yml"),
        *(Path(__file__).parent).glob("*.yaml"),
    ]
)


class StrictLoader(ComposeLoader):
    pass


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def test_files_are_found() -> None:
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_without_duplicate_keys(path: Path) -> None:
    list(yaml.load_all(path.read_text(), Loader=StrictLoader))  # a SafeLoader subclass


def test_duplicate_keys_are_caught() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("x:\n  a: 1\n  a: 2\n", Loader=StrictLoader)
