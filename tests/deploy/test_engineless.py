"""The containers' commands and environments, run here without an engine.

Redis starts with the exact arguments of docker-compose.yml and with the
redis.conf of the Kubernetes StatefulSet; the API and the worker start with
the environment compose gives them (Redis address, port and paths pointed at
this test's own). Then the images' HEALTHCHECK commands and the probes'
conditions are checked against the running processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from latentd.embedded import free_port
from tests.deploy.conftest import COMPOSE_BASE, find, find_tool, interpolate, load_compose
from tests.deploy.test_dockerfile import stages


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def healthcheck(stage: str) -> list[str]:
    """The exec-form HEALTHCHECK command of a Dockerfile stage."""
    (args,) = [a for keyword, a in stages()[stage] if keyword == "HEALTHCHECK"]
    return list(json.loads(re.search(r"CMD\s+(\[.*\])\s*$", args).group(1)))  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # latentd's processes write every thread's stack to stderr
        time.sleep(1)
        proc.kill()
        proc.wait()
        stacks = proc.stderr.read().decode(errors="replace")[-8000:] if proc.stderr else ""
        raise AssertionError(f"still running {timeout} s after SIGTERM; its stderr:\n{stacks}") from None


def start_redis(args: list[str], tmp: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    port = free_port()
    # Later arguments win: only the address and the data directory are ours.
    command = [*args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--daemonize", "no"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert proc.poll() is None, f"redis-server refused its arguments: {command}"
            return False

    wait_for(answers, 10, "redis-server")
    return proc, client


def assert_durable(client: redis.Redis) -> None:
    config = client.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"
    assert int(config["maxmemory"]) > 0
    assert config["save"] == ""


@pytest.fixture
def compose_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    binary = find_tool("redis-server")
    command = interpolate(load_compose(COMPOSE_BASE))["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    proc, client = start_redis([binary, *command[1:]], tmp_path)
    yield client
    stop(proc)


def test_compose_redis_arguments_give_a_durable_redis(compose_redis: redis.Redis) -> None:
    assert_durable(compose_redis)
    assert int(compose_redis.config_get("maxmemory")["maxmemory"]) == 2 * 1024**3


def test_kubernetes_redis_conf_gives_a_durable_redis(tmp_path: Path, rendered: dict[str, Any]) -> None:
    binary = find_tool("redis-server")
    conf = find(rendered["bundled-redis"], "ConfigMap", "redis-config")["data"]["redis.conf"]
    # The pod's data directory does not exist here; everything else is the pod's file.
    assert re.search(r"^dir /data$", conf, re.MULTILINE)
    (tmp_path / "redis.conf").write_text(re.sub(r"^dir /data$", f"dir {tmp_path}", conf, flags=re.MULTILINE))
    proc, client = start_redis([binary, str(tmp_path / "redis.conf")], tmp_path)
    try:
        assert_durable(client)
    finally:
        stop(proc)


def service_env(service: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTD_")}
    environment = interpolate(load_compose(COMPOSE_BASE))["services"][service]["environment"]
    env.update({k: str(v) for k, v in environment.items()})
    env.update(overrides)
    return env


def test_api_starts_with_the_compose_environment(compose_redis: redis.Redis, tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{compose_redis.connection_pool.connection_kwargs['port']}/0"
    # 127.0.0.1 instead of the container's 0.0.0.0: nothing here listens beyond loopback.
    env = service_env("api", LATENTD_REDIS_URL=url, LATENTD_PORT=str(port), LATENTD_HOST="127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentd.cli", "api"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 20, "the API")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        # The image's HEALTHCHECK, as Docker runs it inside the container.
        check = healthcheck("api")
        assert check[0] == "python"
        result = subprocess.run([sys.executable, *check[1:]], env=env, capture_output=True, timeout=10)
        assert result.returncode == 0, result.stderr
    finally:
        assert stop(proc) in (0, -signal.SIGTERM)


def test_worker_readiness_follows_the_model_and_drains_on_sigterm(
    compose_redis: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip("torch", reason="the worker needs torch (pip install torch==2.13.0)")
    from worker.builtin import MODEL_DIR

    model: dict[str, str] = {}
    if not MODEL_DIR.is_dir():
        # Until the built-in model is in the tree, the test suite's tiny model stands in.
        tiny = request.getfixturevalue("tiny_model_dir")
        model = {"LATENTD_MODEL": str(tiny), "LATENTD_MODEL_NAME": tiny.name}
    ready = tmp_path / "run" / "ready"
    url = f"redis://127.0.0.1:{compose_redis.connection_pool.connection_kwargs['port']}/0"
    env = service_env(
        "worker",
        **model,
        LATENTD_REDIS_URL=url,
        LATENTD_DEVICE="cpu",
        LATENTD_READY_FILE=str(ready),
        LATENTD_CACHE_DIR=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "cache" / "hf"),
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentd.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        check = healthcheck("worker")
        assert subprocess.run(check, env=env, timeout=10).returncode != 0, "ready before the model is loaded?"

        def loaded() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            return ready.exists()

        wait_for(loaded, 60, "the worker's ready file")
        assert subprocess.run(check, env=env, timeout=10).returncode == 0
    finally:
        code = stop(proc)
    assert code == 0, "SIGTERM must end the worker cleanly"
    assert not ready.exists(), "the ready file must go when the worker exits"
