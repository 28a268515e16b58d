"""The Dockerfile: hadolint (with its built-in shellcheck on RUN lines) and the
properties the images promise. Building needs a Docker engine, which CI here
does not have; deploy/README.md says what only a real build checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import API_PORT, ROOT, find_tool

DOCKERFILE = ROOT / "Dockerfile"
HERE = Path(__file__).parent


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions (keyword, arguments) by stage name, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            name = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            current = result.setdefault(name.group(1) if name else f"stage{len(result)}", [])
        current.append((keyword, args.strip()))
    return result


def stage_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stages()[stage]:
        if keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S*)", args):
                env[key] = value
    return env


def test_hadolint_passes() -> None:
    hadolint = find_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(HERE / "hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", ["api", "worker"])
def test_targets_run_as_non_root(target: str) -> None:
    users = [args for keyword, args in stages()[target] if keyword == "USER"]
    assert users, f"{target} has no USER"
    assert not users[-1].startswith(("root", "0")), users[-1]


def test_dependencies_come_from_hash_locked_files() -> None:
    for stage, instructions in stages().items():
        for keyword, args in instructions:
            if keyword == "RUN" and "pip install" in args:
                installs = re.split(r"&&", args)
                for command in installs:
                    if "pip install" not in command:
                        continue
                    # Either a hash-checked lock file, or the project's own wheel with --no-deps.
                    assert "--require-hashes" in command or (
                        "--no-deps" in command and "/dist/" in command
                    ), f"{stage}: unlocked install: {command.strip()}"


def test_lock_files_pin_every_dependency_with_hashes() -> None:
    for lock in (ROOT / "requirements").glob("*.txt"):
        requirements = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", lock.read_text(), re.MULTILINE)
        assert requirements, lock
        for block in re.split(r"\n(?=\S)", lock.read_text()):
            if block.startswith("#") or not block.strip():
                continue
            assert "==" in block.splitlines()[0], f"{lock.name}: {block[:80]}"
            assert "--hash=sha256:" in block, f"{lock.name}: {block[:80]}"


def test_lock_files_cover_pyproject() -> None:
    """A dependency added to pyproject.toml without re-running requirements/lock.sh fails here."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    def locked(lock: str) -> set[str]:
        text = (ROOT / "requirements" / lock).read_text()
        return {n.lower().replace("_", "-") for n in re.findall(r"^([A-Za-z0-9_.\-]+)==", text, re.MULTILINE)}

    assert names(project["dependencies"]) <= locked("api.txt")
    assert names(project["dependencies"] + project["optional-dependencies"]["worker"]) <= locked("worker.txt")
    assert "torch" not in locked("api.txt"), "the API image must not carry torch"


def test_api_image_listens_on_all_interfaces_and_checks_health() -> None:
    env = stage_env("api")
    assert env["LATENTD_HOST"] == "0.0.0.0"
    assert int(env.get("LATENTD_PORT", API_PORT)) == API_PORT
    assert ("EXPOSE", str(API_PORT)) in stages()["api"]
    health = [args for keyword, args in stages()["api"] if keyword == "HEALTHCHECK"]
    assert health
    assert "/healthz" in health[0]


def test_worker_image_has_cache_volume_and_readiness_file() -> None:
    env = stage_env("worker")
    instructions = stages()["worker"]
    volumes = [args for keyword, args in instructions if keyword == "VOLUME"]
    assert volumes
    assert env["LATENTD_CACHE_DIR"] in volumes[0]
    assert env["HF_HOME"].startswith(env["LATENTD_CACHE_DIR"]), "hub downloads must land on the cache volume"
    health = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert health
    assert "LATENTD_READY_FILE" in health[0]
    assert env["LATENTD_READY_FILE"]


def test_worker_image_checks_the_builtin_model_is_inside() -> None:
    runs = " ".join(args for keyword, args in stages()["worker-venv"] if keyword == "RUN")
    assert "'builtin' / 'model'" in runs
