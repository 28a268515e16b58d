"""docker-compose.yml and its variants: the Compose specification's JSON schema,
`docker compose config` (the real Compose parser and merger, which needs no
engine), and the properties the single-host setup promises."""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.deploy.conftest import (
    API_PORT,
    COMPOSE_BASE,
    COMPOSE_OVERRIDES,
    ROOT,
    find_tool,
    interpolate,
    load_compose,
)

VARIANTS = [[COMPOSE_BASE], *([COMPOSE_BASE, override] for override in COMPOSE_OVERRIDES)]


def variant_id(files: list[Path]) -> str:
    return "+".join(f.name for f in files)


@cache
def compose_schema() -> dict[str, Any]:
    # The Compose specification's schema as vendored by check-jsonschema.
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    return json.loads(text)


def validate(document: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", [COMPOSE_BASE, *COMPOSE_OVERRIDES], ids=lambda p: p.name)
def test_file_matches_compose_schema(path: Path) -> None:
    validate(load_compose(path))


def compose_config(files: list[Path], env_file: Path | None = None) -> dict[str, Any]:
    binary = find_tool("docker-compose")
    command = [binary, "--project-directory", str(ROOT)]
    for f in files:
        command += ["-f", str(f)]
    # Never the developer's own .env, which compose would read by default.
    command += ["--env-file", str(env_file or "/dev/null")]
    # An empty environment: what the files say, not what this shell exports.
    result = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("files", VARIANTS, ids=variant_id)
def test_docker_compose_config_accepts_and_merges(files: list[Path]) -> None:
    merged = compose_config(files)
    validate(merged)
    assert {"redis", "api", "worker"} <= set(merged["services"])


def test_env_example_is_a_working_env_file() -> None:
    merged = compose_config([COMPOSE_BASE], env_file=ROOT / ".env.example")
    assert merged["services"]["worker"]["environment"]["LATENTD_MODEL"] == "builtin"


def base() -> dict[str, Any]:
    return interpolate(load_compose(COMPOSE_BASE))


def test_redis_is_durable_and_never_evicts() -> None:
    redis = base()["services"]["redis"]
    command = " ".join(redis["command"])
    assert re.search(r"--appendonly yes\b", command)
    assert re.search(r"--maxmemory-policy noeviction\b", command)
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must live on a volume"


def test_redis_is_healthy_only_once_it_answers_pong(tmp_path: Path) -> None:
    # redis-cli exits 0 on an error reply: a Redis still loading its AOF (LOADING) was healthy, and
    # the worker that started then gave up on it. Here the error reply is NOAUTH.
    from tests.conftest import RedisServer

    kind, check = base()["services"]["redis"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    server = RedisServer(tmp_path)
    server.start()
    try:
        local = check.replace("redis-cli", f"redis-cli -p {server.port}")
        assert subprocess.run(["sh", "-c", local]).returncode == 0
        server.client().config_set("requirepass", "x")
        assert subprocess.run(["sh", "-c", local], capture_output=True).returncode != 0
    finally:
        server.stop()


def test_api_and_worker_wait_for_a_healthy_redis() -> None:
    services = base()["services"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_api_publishes_its_port_on_loopback_by_default() -> None:
    api = base()["services"]["api"]
    (mapping,) = api["ports"]
    host, _, container = mapping.rpartition(":")
    assert container == str(API_PORT) == api["environment"]["LATENTD_PORT"]
    assert host.startswith("127.0.0.1:")


def test_worker_reserves_one_gpu_and_keeps_its_cache_on_a_named_volume() -> None:
    compose = base()
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]
    volume, _, target = worker["volumes"][0].partition(":")
    assert volume in compose["volumes"]
    assert target == "/var/cache/latentd"


def duration_seconds(text: str) -> float:
    """A Compose (Go) duration: "11m", "11m0s", "1h30m", "90s"."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@pytest.mark.parametrize("env_file", [None, ROOT / ".env.example"], ids=["defaults", "env.example"])
@pytest.mark.parametrize("files", VARIANTS, ids=variant_id)
def test_worker_grace_period_outlasts_its_shutdown_grace_and_the_longest_job(
    files: list[Path], env_file: Path | None
) -> None:
    """Docker waits longer than the worker's own SIGTERM grace, which lasts a whole job."""
    services = compose_config(files, env_file)["services"]
    job_timeout = float(services["api"]["environment"]["LATENTD_JOB_TIMEOUT"])
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert workers
    for worker in workers:
        shutdown_grace = float(worker["environment"]["LATENTD_SHUTDOWN_GRACE"])
        assert duration_seconds(worker["stop_grace_period"]) > shutdown_grace >= job_timeout > 0


def test_api_grace_period_outlasts_its_own_shutdown() -> None:
    from latentd.cli import API_STOP_GRACE

    api = base()["services"]["api"]
    assert duration_seconds(api["stop_grace_period"]) >= API_STOP_GRACE + 10  # then its reaper's join


def test_grace_settings_come_from_the_env_file() -> None:
    env = {"LATENTD_JOB_TIMEOUT": "1200", "LATENTD_SHUTDOWN_GRACE": "1200", "WORKER_STOP_GRACE_PERIOD": "21m"}
    services = interpolate(load_compose(COMPOSE_BASE), env)["services"]
    assert services["api"]["environment"]["LATENTD_JOB_TIMEOUT"] == "1200"
    assert services["worker"]["environment"]["LATENTD_SHUTDOWN_GRACE"] == "1200"
    assert services["worker"]["stop_grace_period"] == "21m"


def test_api_default_model_is_the_model_the_worker_serves() -> None:
    for env in (
        {},
        {"LATENTD_MODEL": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
        {"LATENTD_MODEL_NAME": "sd"},
    ):
        services = interpolate(load_compose(COMPOSE_BASE), env)["services"]
        assert (
            services["api"]["environment"]["LATENTD_DEFAULT_MODEL"]
            == (services["worker"]["environment"]["LATENTD_MODEL_NAME"])
        ), env


def test_the_gpu_worker_fails_loudly_without_cuda_and_the_api_takes_its_public_address() -> None:
    """`auto` fell back to the CPU without a word on a GPU host whose CUDA did not start, and
    behind a proxy the OpenAI route's image URLs named the address it forwarded to."""
    for env_file in (None, ROOT / ".env.example"):
        merged = compose_config([COMPOSE_BASE], env_file=env_file)
        assert merged["services"]["worker"]["environment"]["LATENTD_DEVICE"] == "cuda"
    public = {"LATENTD_PUBLIC_URL": "https://img.example"}
    api = interpolate(load_compose(COMPOSE_BASE), public)["services"]["api"]
    assert api["environment"]["LATENTD_PUBLIC_URL"] == "https://img.example"


def test_cpu_variant_drops_the_gpu_reservation() -> None:
    merged = compose_config([COMPOSE_BASE, ROOT / "docker-compose.cpu.yml"])
    worker = merged["services"]["worker"]
    assert "devices" not in json.dumps(worker.get("deploy", {}))
    assert worker["environment"]["LATENTD_DEVICE"] == "cpu"


def test_multi_gpu_variant_pins_one_distinct_gpu_per_worker() -> None:
    merged = compose_config([COMPOSE_BASE, ROOT / "docker-compose.multi-gpu.yml"])
    pinned = []
    for name, service in merged["services"].items():
        if name.startswith("worker"):
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            pinned += device["device_ids"]
    assert len(pinned) >= 2
    assert len(pinned) == len(set(pinned))
