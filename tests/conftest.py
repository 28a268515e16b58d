"""Fixtures: a real redis-server on a free port, a tiny model built offline, and
real worker and API processes talking to each other over Redis and HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from latentd.contract import Keys, WorkerInfo
from latentd.embedded import find_redis_server, free_port, redis_args

# torch in the test processes runs on one thread, as the workers they start do: pytest-xdist
# keeps every core busy, and torch's threads, each waiting on the others, crawl when one is
# descheduled (tests/test_pipeline.py took 176 s beside two busy cores on two threads, 91 s on
# one). Read when torch is first imported, after this file; a test that needs more sets them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_MODEL = "tiny"
# The tests' HTTP client. HTTP.get() and its kin build a client, TLS context included, at each call:
# 26 ms of CPU against 1 ms here, and tests poll every 50 to 100 ms while workers start and jobs
# run. A fresh connection each request still (no keep-alive), as those did.
HTTP = httpx.Client(timeout=5, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    """A redis-server of the test session's own, with AOF on, that a test may stop and restart."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> None:
        binary = find_redis_server()  # the one on PATH, else the `embedded` extra's
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([binary, *redis_args(self.port, self.data_dir)])
        client = self.client()

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 10, what="redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# Tests that flush their database use this one, apart from the shared service's db 0.
PRIVATE_DB = 15


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a flushed database of its own (`PRIVATE_DB`), never the one the shared service uses."""
    client = redis.Redis.from_url(redis_server.url_for(PRIVATE_DB))
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / TINY_MODEL)


def flag_everything_checker() -> tuple[Any, Any]:
    """A tiny, random Stable Diffusion safety checker (diffusers' own) whose thresholds flag every
    image, and the feature extractor it reads images through."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**tower, "projection_dim": 32},
        vision_config={**tower, "projection_dim": 32, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)
    return checker, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTD_")}
    env.update(
        {
            "LATENTD_REDIS_URL": redis_url,
            "LATENTD_LOG_LEVEL": "info",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def sitecustomize(tmp: Path, source: str) -> str:
    """A PYTHONPATH whose `sitecustomize` runs `source` as a process starts (a worker, given it, gets
    a failure injected where the product has no hook), with the repository importable from it."""
    folder = Path(tempfile.mkdtemp(prefix="inject-", dir=tmp))
    (folder / "sitecustomize.py").write_text(source)
    return os.pathsep.join([str(folder), str(ROOT)])


def register_ghost(
    r: redis.Redis,
    model: str,
    name: str = "ghost",
    ttl: int = 120,
    native_size: int | None = 64,
    weights: str | None = None,
) -> None:
    """A worker's registration without the worker: the API accepts jobs for `model`, and nothing
    runs them. Its native size is the tiny model's, so a job a real worker takes later is small."""
    info = WorkerInfo(
        name=name,
        model=model,
        device="cpu",
        pid=1,
        hostname="h",
        started_at=0,
        native_size=native_size,
        weights=weights,
    )
    r.set(Keys.worker(name), info.model_dump_json(), ex=ttl)
    r.sadd(Keys.WORKERS, name)


def spawn(args: list[str], env: dict[str, str], log: Path, new_session: bool = False) -> Proc:
    """`latentd ARGS`; with `new_session`, the leader of its own process group, which a test can
    signal as a terminal does (Ctrl-C reaches every process of the foreground group)."""
    handle = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentd.cli", *args],
        env=env, stdout=handle, stderr=handle, cwd=ROOT, start_new_session=new_session,
    )  # fmt: skip
    return Proc(proc, log)


def start_worker(redis_url: str, model_dir: Path, tmp: Path, name: str = "w1", **extra: str) -> Proc:
    ready = tmp / f"{name}.ready"
    settings = {
        "LATENTD_MODEL": str(model_dir),
        "LATENTD_MODEL_NAME": TINY_MODEL,
        "LATENTD_WORKER_NAME": name,
        "LATENTD_READY_FILE": str(ready),
        "LATENTD_HEARTBEAT_INTERVAL": "0.5",
        "LATENTD_TORCH_THREADS": "1",
        "LATENTD_CACHE_DIR": str(tmp / "cache"),
    }
    env = base_env(redis_url, **{**settings, **extra})
    worker = spawn(["worker"], env, tmp / f"{name}.log")
    # A compiling worker runs its warm-up first: 146 s cold for the tiny model on two CPU cores.
    timeout = 480 if extra.get("LATENTD_TORCH_COMPILE") == "true" else 120
    try:
        wait_until(lambda: ready.exists() or worker.proc.poll() is not None, timeout, what="worker ready")
    except AssertionError:
        worker.stop()
        raise
    # Ready counts even if it has died since: a worker meant to die on the job waiting for it may.
    if not ready.exists():
        raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.output()[-3000:]}")
    return worker


def start_api(redis_url: str, tmp: Path, name: str = "api", **extra: str) -> tuple[Proc, str]:
    port = free_port()
    env = base_env(redis_url, **{"LATENTD_PORT": str(port), "LATENTD_DEFAULT_MODEL": TINY_MODEL, **extra})
    api = spawn(["api"], env, tmp / f"{name}.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if api.proc.poll() is not None:
            raise AssertionError(f"api exited:\n{api.output()[-3000:]}")
        try:
            return HTTP.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 30, what="api healthy")
    return api, url


@dataclass
class Service:
    url: str
    redis: redis.Redis
    http: httpx.Client
    worker: Proc
    api: Proc

    def submit(self, **body: Any) -> dict[str, Any]:
        body.setdefault("prompt", "a red circle on a blue background")
        response = self.http.post("/v1/generations", json=body)
        assert response.status_code == 202, response.text
        result: dict[str, Any] = response.json()
        return result

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/generations/{job_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def wait_terminal(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        terminal = ("succeeded", "failed", "canceled")
        result: dict[str, Any] = wait_until(
            lambda: (v := self.status(job_id))["status"] in terminal and v,
            timeout,
            what=f"job {job_id} to end",
        )
        return result


@pytest.fixture(scope="session")
def service(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One worker serving the tiny model and one API process, for the whole session.

    Tests share it and do not flush Redis under it: each works with its own job ids.
    """
    tmp = tmp_path_factory.mktemp("service")
    worker = start_worker(redis_server.url, tiny_model_dir, tmp)
    try:
        api, url = start_api(redis_server.url, tmp)
    except BaseException:
        worker.stop()
        raise
    http = httpx.Client(base_url=url, timeout=30)
    try:
        yield Service(url=url, redis=redis_server.client(), http=http, worker=worker, api=api)
    finally:
        http.close()
        api.stop()
        worker.stop()


LEASE = "3"
LONG_JOB = {"prompt": "a long job", "steps": 40, "width": 96, "height": 96, "seed": 3}


@dataclass
class Cluster:
    redis: RedisServer
    url: str
    model_dir: Path
    tmp: Path

    def worker(self, name: str, injected: str | None = None, **env: str) -> Proc:
        """A worker with a short lease; `injected`: code it runs as it starts (`sitecustomize`)."""
        if injected is not None:
            env["PYTHONPATH"] = str(sitecustomize(self.tmp, injected))
        return start_worker(
            self.redis.url, self.model_dir, self.tmp, name=name, **{"LATENTD_LEASE_SECONDS": LEASE, **env}
        )

    def wait_idle(self, name: str) -> None:
        """Until RQ's loop says worker `name` is idle: its signal handlers are in place then."""
        r = self.redis.client()
        wait_until(lambda: r.hget(f"rq:worker:{name}", "state") == b"idle", 30, what="RQ's loop")

    def submit(self, body: dict[str, Any]) -> str:
        response = HTTP.post(f"{self.url}/v1/generations", json=body)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        view: dict[str, Any] = HTTP.get(f"{self.url}/v1/generations/{job_id}").json()
        return view

    def wait_terminal(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        view: dict[str, Any] = wait_until(
            lambda: (v := self.status(job_id))["status"] in ("succeeded", "failed", "canceled") and v,
            timeout,
            interval=0.1,
            what=f"job {job_id} to end",
        )
        return view

    def ends_on_another_worker(self, job_id: str) -> dict[str, Any]:
        """The job's final view, once a fresh worker ("b") has found its lapsed lease."""
        second = self.worker("b")
        try:
            return self.wait_terminal(job_id)
        finally:
            second.stop()

    def killed_mid_job(self) -> str:
        """The id of a long job whose worker ("a") was killed (SIGKILL) as it ran."""
        worker = self.worker("a")
        job_id = self.submit(LONG_JOB)
        self.running_on(job_id)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        return job_id

    def running_on(self, job_id: str) -> str:
        def owner() -> str | None:
            view = self.status(job_id)
            if view["status"] == "running" and view["progress"]["step"] > 0:
                worker = self.redis.client().hget(f"latentd:job:{job_id}", "worker")
                return worker.decode() if isinstance(worker, bytes) else None
            return None

        name: str = wait_until(owner, 60, what="job running")
        return name


def make_cluster(tmp_path: Path, model_dir: Path, **api_env: str) -> Iterator[Cluster]:
    """Redis and an API. The API reaps dead workers' jobs while no worker is alive, not within a
    lease of its start: its lease is the longest allowed unless `api_env` says, which keeps it out of
    tests of workers' reapers."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    api, url = start_api(server.url, tmp_path, **{"LATENTD_LEASE_SECONDS": "60", **api_env})
    try:
        yield Cluster(server, url, model_dir, tmp_path)
    finally:
        api.stop()
        server.stop()


def cluster_with_worker(
    tmp_path: Path, model_dir: Path, name: str, **worker_env: str
) -> Iterator[tuple[Cluster, Proc]]:
    """A cluster plus one worker started with these settings, for fixtures."""
    for cluster in make_cluster(tmp_path, model_dir):
        worker = start_worker(cluster.redis.url, model_dir, tmp_path, name=name, **worker_env)
        try:
            yield cluster, worker
        finally:
            worker.stop()


@pytest.fixture
def cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, tiny_model_dir)


@pytest.fixture
def one_attempt_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, tiny_model_dir, LATENTD_MAX_ATTEMPTS="1")
