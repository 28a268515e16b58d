"""Failure modes, each with its own small fixture: Redis going away, a job over its time
limit, a model that cannot load, a full queue."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from latentd.client import generate
from latentd.contract import Keys, WorkerInfo
from latentd.embedded import find_redis_server, free_port
from latentd.store import check_eviction_policy
from tests.conftest import (
    HTTP,
    PRIVATE_DB,
    ROOT,
    TINY_MODEL,
    RedisServer,
    Service,
    base_env,
    register_ghost,
    sitecustomize,
    spawn,
    start_api,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test alone may stop and restart."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_an_api_whose_redis_answers_nothing_starts_unready(tmp_path: Path) -> None:
    # A Redis behind a path that drops packets (a firewall, a NetworkPolicy): its connect is taken
    # and nothing answers. The API exited 3 with a traceback (TimeoutError), restarted for good.
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nothing reads or answers
    try:
        api, url = start_api(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", tmp_path)
        try:
            ready = HTTP.get(f"{url}/readyz", timeout=20)
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "service_unavailable"
            assert "redis_unreachable_at_start" in api.output() and "Traceback" not in api.output()
        finally:
            api.stop()
    finally:
        silent.close()


def test_redis_outage_gives_503_then_recovers(private_redis: RedisServer, tmp_path: Path) -> None:
    api, url = start_api(private_redis.url, tmp_path)
    try:
        # A job record to read back during and after the outage.
        job_id = "outage-job"
        private_redis.client().hset(f"rq:job:{job_id}", "status", "queued")
        private_redis.stop()

        submit = HTTP.post(f"{url}/v1/generations", json={"prompt": "a red circle"}, timeout=10)
        status = HTTP.get(f"{url}/v1/generations/{job_id}", timeout=10)
        ready = HTTP.get(f"{url}/readyz", timeout=10)
        models = HTTP.get(f"{url}/v1/models", timeout=10)
        for response in (submit, status, ready, models):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"]["code"] == "service_unavailable"
            assert "Traceback" not in response.text
        assert HTTP.get(f"{url}/healthz").status_code == 200  # alive, just not ready

        private_redis.start()  # same port, same AOF directory
        wait_until(lambda: HTTP.get(f"{url}/readyz").status_code == 200, 15, what="API ready again")
        assert HTTP.get(f"{url}/v1/models").status_code == 200
        # No live worker in this fixture: a clear 4xx, not a hang and not a 5xx.
        refused = HTTP.post(f"{url}/v1/generations", json={"prompt": "a red circle"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_unavailable"
    finally:
        api.stop()


def test_a_model_whose_worker_is_restarting_answers_503_with_retry_after(
    private_redis: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A submit while the model's only worker restarted got 400, which no client retries."""
    api, url = start_api(private_redis.url, tmp_path)
    try:
        never = HTTP.post(f"{url}/v1/generations", json={"prompt": "x", "model": "never-served"})
        assert never.status_code == 400 and "retry-after" not in never.headers, never.text
        assert never.json()["error"]["code"] == "model_unavailable"
        start_worker(private_redis.url, tiny_model_dir, tmp_path).stop()  # its registration goes too
        time.sleep(1.1)  # past the API's trust in the served models it read last
        for route, body in (
            ("/v1/generations", {"prompt": "x"}),
            ("/v1/images/generations", {"prompt": "x"}),
        ):
            gone = HTTP.post(f"{url}{route}", json={**body, "model": TINY_MODEL})
            assert gone.status_code == 503 and gone.headers["retry-after"] == "5", gone.text
            error = gone.json()["error"]
            assert error["code"] == "model_unavailable" and error["param"] == "model"
            assert "retry shortly" in error["message"]
    finally:
        api.stop()


def test_a_stalled_redis_gives_503_after_one_socket_timeout(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    # A Redis that takes connections but answers nothing (frozen, swapping, a stuck replica): each
    # command was sent again three times on a timeout, 20 s a read, and a submit got no answer
    # in 65 s, then was accepted once Redis woke: a client that had given up and sent it again
    # made a second job. Now a command times out once (5 s) and the request answers 503.
    api, url = start_api(private_redis.url, tmp_path)
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/generations", {"prompt": "x"})):
            response = HTTP.request(method, url + path, json=body, timeout=15)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "service_unavailable"
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
        api.stop()


def test_a_full_redis_refuses_writes_with_503_and_reads_go_on(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    # maxmemory reached, under the noeviction policy latentd requires: Redis refuses writes with
    # an OOM error. Submits and cancels say so (they were 500 internal_error), and reads, which
    # spend a write on the per-key rate limit, still work.
    r = private_redis.client()
    register_ghost(r, "tiny")
    key = "ops-key-0123456789abcdef"
    auth = {"Authorization": f"Bearer {key}"}
    api, url = start_api(
        private_redis.url, tmp_path, LATENTD_API_KEYS=f"ops:{key}", LATENTD_RATE_LIMIT_PER_MINUTE="100"
    )
    try:
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=auth).json()["id"]
        r.config_set("maxmemory", r.info("memory")["used_memory"])
        submit = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=auth)
        cancel = HTTP.post(f"{url}/v1/generations/{job_id}/cancel", headers=auth)
        for response in (submit, cancel):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "service_unavailable"
            assert "full" in response.json()["error"]["message"]
            assert response.headers["retry-after"].isdigit()
        assert HTTP.get(f"{url}/v1/generations/{job_id}", headers=auth).json()["status"] == "queued"
        assert HTTP.get(f"{url}/v1/models", headers=auth).status_code == 200
        r.config_set("maxmemory", 0)
        assert HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=auth).status_code == 202
        assert r.llen("rq:queue:latentd:tiny") == 2  # the refused submit left nothing behind
        assert "Traceback" not in api.output()
    finally:
        api.stop()


# The first job asking for it deadlocks in native code, the GIL released: deaf to signals, as a
# hung accelerator's call is.
HANG_ONCE = """
import ctypes
import os

import worker.pipeline

_generate = worker.pipeline.Runner.generate


def generate(self, payloads, on_step):
    if any("hang" in p.prompt for p in payloads) and not os.path.exists({mark!r}):
        open({mark!r}, "w").close()
        mutex = ctypes.create_string_buffer(64)  # a default pthread mutex, unlocked
        lock = ctypes.CDLL(None).pthread_mutex_lock
        lock(mutex)
        lock(mutex)
    return _generate(self, payloads, on_step)


worker.pipeline.Runner.generate = generate
"""


def test_a_job_stuck_past_its_time_limit_ends_its_worker_and_runs_elsewhere(
    private_redis: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Its time limit's signal never reached the stuck call: the job read `running` for good, its
    # lease renewed by the worker's thread, and the worker held its device.
    injected = sitecustomize(tmp_path, HANG_ONCE.format(mark=str(tmp_path / "hung")))
    lease = {"LATENTD_LEASE_SECONDS": "3"}
    stuck = start_worker(
        private_redis.url, tiny_model_dir, tmp_path, name="stuck", PYTHONPATH=injected, **lease
    )
    api, url = start_api(private_redis.url, tmp_path, LATENTD_JOB_TIMEOUT="1")
    other = None
    try:
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "hang", "steps": 2}).json()["id"]
        wait_until(lambda: (tmp_path / "hung").exists(), 30, what="the call to hang")
        other = start_worker(private_redis.url, tiny_model_dir, tmp_path, name="other", **lease)
        assert stuck.proc.wait(30) == 70  # its limit (1 s) and two leases (6 s) on
        assert f"job_stuck job_ids={job_id}" in stuck.output()
        view = wait_until(
            lambda: (v := HTTP.get(f"{url}/v1/generations/{job_id}").json())["status"] == "succeeded" and v,
            30,
            what="the job to run again",
        )
        assert view["attempts"] == 2
    finally:
        api.stop()
        stuck.stop()
        if other is not None:
            other.stop()


def test_job_over_its_time_limit_fails_with_timeout(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A second worker and an API whose job time limit is 1 s, on a queue of their own."""
    worker = start_worker(
        redis_server.url, tiny_model_dir, tmp_path, name="slowpoke", LATENTD_MODEL_NAME="tiny-timeout"
    )
    api, url = start_api(
        redis_server.url, tmp_path, LATENTD_JOB_TIMEOUT="1", LATENTD_DEFAULT_MODEL="tiny-timeout"
    )
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            job_id = http.post(
                "/v1/generations", json={"prompt": "slow", "steps": 150, "width": 512, "height": 512}
            )
            job_id = job_id.json()["id"]

            def ended() -> dict[str, object] | None:
                view = http.get(f"/v1/generations/{job_id}").json()
                return view if view["status"] in ("succeeded", "failed", "canceled") else None

            view = wait_until(ended, 60, interval=0.2, what="timeout")
            assert view["status"] == "failed"
            assert view["error"]["code"] == "timeout"
            # The worker carries on.
            ok = http.post("/v1/generations", json={"prompt": "quick", "steps": 1}).json()["id"]
            wait_until(lambda: http.get(f"/v1/generations/{ok}").json()["status"] == "succeeded", 60)
    finally:
        api.stop()
        worker.stop()


# Every pipeline call takes 3 s per job in it, whatever its size: a lone job fits a 5 s limit,
# two jobs in one call take 6 s (under twice 5 s).
SLOW_CALLS = """
import time

from worker.pipeline import Runner

_generate = Runner.generate


def generate(self, payloads, on_step):
    time.sleep(3 * len(payloads))
    return _generate(self, payloads, on_step)


Runner.generate = generate
"""


def test_a_batch_has_the_time_its_jobs_would_have_had_one_after_another(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        redis_server.url, tiny_model_dir, tmp_path, name="batcher", LATENTD_MODEL_NAME="tiny-batch-limit",
        PYTHONPATH=sitecustomize(tmp_path, SLOW_CALLS), LATENTD_BATCH_WAIT_MS="1000",
    )  # fmt: skip
    api, url = start_api(
        redis_server.url, tmp_path, LATENTD_JOB_TIMEOUT="5", LATENTD_DEFAULT_MODEL="tiny-batch-limit"
    )
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            blocker = http.post("/v1/generations", json={"prompt": "first", "steps": 1}).json()["id"]
            wait_until(lambda: http.get(f"/v1/generations/{blocker}").json()["status"] == "running", 30)
            pair = [http.post("/v1/generations", json={"prompt": p, "steps": 2}).json()["id"] for p in "ab"]
            views = [
                wait_until(
                    lambda j=j: (
                        (v := http.get(f"/v1/generations/{j}").json())["status"] not in ("queued", "running")
                        and v
                    ),
                    60,
                    what="the batch to end",
                )
                for j in pair
            ]
        assert redis_server.client().hget(f"latentd:job:{pair[0]}", "batch_jobs") == b"2"  # one call
        assert [v["status"] for v in views] == ["succeeded", "succeeded"], views
    finally:
        api.stop()
        worker.stop()


def test_model_that_cannot_load_stops_the_worker_with_a_clear_message(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{ this is not json")
    weights = tmp_path / "weights.bin"  # a file, but no checkpoint format the worker loads
    weights.write_bytes(b"\0" * 16)
    # In the cache, but broken: the cause is what is wrong with it, not that it is not there.
    snapshot = tmp_path / "cache" / "hub" / "models--someorg--cached-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    (snapshot / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    # A checkpoint whose base configuration is in LATENTD_CACHE_DIR (but broken): diffusers looked
    # for it in HF_HOME instead, and the worker said it was not cached there.
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, checkpoint)
    base = tmp_path / "cache" / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    shutil.copytree(snapshot.parent.parent, base)
    env = base_env(redis_server.url, LATENTD_CACHE_DIR=str(tmp_path / "cache"))
    models = {
        "single": str(checkpoint),
        "broken": str(broken),
        "missing": str(tmp_path / "nothing-here"),
        "hub": "someorg/not-cached-model",  # HF_HUB_OFFLINE=1: no download is tried
        "bin": str(weights),
        "cached": "someorg/cached-model",
    }
    # Started together: each spends most of its time importing torch and diffusers.
    workers = {
        name: spawn(["worker"], {**env, "LATENTD_MODEL": model}, tmp_path / f"{name}.log")
        for name, model in models.items()
    }
    from worker.config import WorkerSettings

    for name, each in workers.items():
        assert each.proc.wait(120) == 3, (name, each.output()[-2000:])
        assert "Traceback" not in each.output()
        # Submits were told a worker was loading the model (503, retry) for an hour: they are told
        # what they were before, here that no worker served it lately (400)...
        served = WorkerSettings(model=models[name]).served_name()
        assert redis_server.client().hget(Keys.MODELS_SEEN, served) is None, name
    # ... and where a worker served it a minute ago (one restarting), still that (503).
    r, served_lately = redis_server.client(), str(time.time() - 60)
    r.hset(Keys.MODELS_SEEN, "restarting", served_lately)
    again = spawn(
        ["worker"],
        {**env, "LATENTD_MODEL": str(broken), "LATENTD_MODEL_NAME": "restarting"},
        tmp_path / "again.log",
    )
    assert again.proc.wait(120) == 3, again.output()[-2000:]
    assert r.hget(Keys.MODELS_SEEN, "restarting") == served_lately.encode()
    out = {name: each.output() for name, each in workers.items()}
    assert "cannot load model" in out["broken"] and str(broken) in out["broken"]
    assert "does not exist" in out["missing"]
    assert "someorg/not-cached-model" in out["hub"]
    assert "not in the cache" in out["hub"] and "HF_HUB_OFFLINE is set" in out["hub"]
    assert "is not a .safetensors or .ckpt checkpoint" in out["bin"]  # it said: does not exist
    assert "no file named config.json" in out["cached"]
    assert "not in the cache" not in out["cached"]
    assert "no file named config.json" in out["single"] and str(base) in out["single"]
    assert "has not cached it" not in out["single"]


async def submit_together(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient() as client:
        replies = await asyncio.gather(*(client.post(url, json={"prompt": "x"}) for _ in range(n)))
    return [reply.status_code for reply in replies]


def test_full_queue_answers_429(redis_server: RedisServer, tmp_path: Path) -> None:
    """Queue depth limit: a worker registration without a worker, so nothing drains the queue."""
    r = redis_server.client()
    model = "tiny-full"
    register_ghost(r, model, ttl=60)
    api, url = start_api(redis_server.url, tmp_path, LATENTD_MAX_QUEUE_DEPTH="2", LATENTD_DEFAULT_MODEL=model)
    try:
        # Concurrent submits: the depth check and the push are one step, so no two pass the check
        # together (they all did, when the check was a round trip of its own).
        codes = asyncio.run(submit_together(f"{url}/v1/generations", 16))
        assert sorted(codes) == [202] * 2 + [429] * 14
        full = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"})
        assert full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) > 0
        assert r.llen(f"rq:queue:latentd:{model}") == 2  # accepted jobs kept, the refused one not added
    finally:
        api.stop()
        r.delete("latentd:worker:ghost", f"rq:queue:latentd:{model}")
        r.srem("latentd:workers", "ghost")


def test_a_queued_job_canceled_is_counted_once_and_a_job_being_taken_is_left_to_its_flag(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    r = private_redis.client()
    register_ghost(r, "tiny")
    api, url = start_api(private_redis.url, tmp_path, LATENTD_DEFAULT_MODEL="tiny")
    counted = 'latentd_jobs_total{code="",model="tiny",status="canceled"} 1.0'
    try:
        queued = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}).json()["id"]
        canceled = HTTP.post(f"{url}/v1/generations/{queued}/cancel").json()
        assert canceled["status"] == "canceled"
        timings = canceled["timings"]  # it ended: when, as a job that ran says
        assert timings["finished_at"] is not None and timings["finished_at"] >= timings["created_at"]
        assert counted in HTTP.get(f"{url}/metrics").text  # no worker ever sees it: the API counts it
        # A job a worker is taking: RQ moves it off its queue, then marks it started. A cancel in
        # between must not end it in RQ, or it would go canceled, then running, then canceled.
        taken = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}).json()["id"]
        r.lmove("rq:queue:latentd:tiny", "rq:queue:latentd:tiny:intermediate", "LEFT", "RIGHT")
        reply = HTTP.post(f"{url}/v1/generations/{taken}/cancel").json()
        assert reply["status"] == "queued" and reply["cancel_requested"], reply
        r.hset(f"rq:job:{taken}", "status", "started")  # the worker then sees the flag
        assert HTTP.get(f"{url}/v1/generations/{taken}").json()["status"] == "running"
        assert counted in HTTP.get(f"{url}/metrics").text
    finally:
        api.stop()


def test_a_queued_job_whose_cancel_meets_a_redis_error_is_canceled_or_left_on_its_queue(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel took the job off its queue, then recorded it canceled: a failure in between (Redis
    stalled or full, the reply lost) left it `queued` on no queue for good, holding its key's
    in-flight slot, and the push back meant to mend that failed the same way."""
    from fastapi.testclient import TestClient

    from app.config import ApiSettings
    from app.main import create_app

    register_ghost(redis_client, "tiny")
    queue = "rq:queue:latentd:tiny"
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), default_model="tiny")
    real_command = redis.client.Redis.execute_command
    real_execute = redis.client.Pipeline.execute
    # "refuse": the script that takes a job off its queue is refused; "lose": it runs, and from
    # then on Redis is "gone" (its reply lost, every write after it refused).
    mode = ["working"]

    def command(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
        takes_off = args[0] == "EVAL" and "LREM" in str(args[1])
        if mode[0] == "gone" or (takes_off and mode[0] == "refuse"):
            raise redis.ConnectionError("injected")
        reply = real_command(self, *args, **kwargs)
        if takes_off and mode[0] == "lose":
            mode[0] = "gone"
        return reply

    def execute(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        if mode[0] == "gone":
            raise redis.ConnectionError("injected")
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Redis, "execute_command", command)
    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    with TestClient(create_app(settings)) as client:
        # Refused before it took the job off its queue: still there, its flag set to end it.
        job_id = client.post("/v1/generations", json={"prompt": "x"}).json()["id"]
        mode[0] = "refuse"
        assert client.post(f"/v1/generations/{job_id}/cancel").status_code == 503
        mode[0] = "working"
        assert redis_client.lrange(queue, 0, -1) == [job_id.encode()]
        view = client.get(f"/v1/generations/{job_id}").json()
        assert view["status"] == "queued" and view["cancel_requested"]  # a worker ends it canceled
        redis_client.delete(queue)
        # Gone from the moment the job left its queue.
        job_id = client.post("/v1/generations", json={"prompt": "x"}).json()["id"]
        mode[0] = "lose"
        assert client.post(f"/v1/generations/{job_id}/cancel").status_code == 503
        mode[0] = "working"
        assert client.get(f"/v1/generations/{job_id}").json()["status"] == "canceled"
        assert redis_client.llen(queue) == 0
        # Left queued on no list by a cancel of an earlier release: the next cancel ends it.
        stranded = client.post("/v1/generations", json={"prompt": "x"}).json()["id"]
        redis_client.lrem(queue, 1, stranded)
        assert client.post(f"/v1/generations/{stranded}/cancel").json()["status"] == "canceled"
        # One a worker has taken (on the intermediate list, not yet started) is left to its flag.
        taken = client.post("/v1/generations", json={"prompt": "x"}).json()["id"]
        redis_client.lmove(queue, f"{queue}:intermediate", "LEFT", "RIGHT")
        reply = client.post(f"/v1/generations/{taken}/cancel").json()
        assert reply["status"] == "queued" and reply["cancel_requested"], reply


def test_a_held_read_whose_client_hung_up_stops_reading(private_redis: RedisServer, tmp_path: Path) -> None:
    """A `?wait=` read (and the OpenAI route) went on reading its job from Redis every second to the
    end of its wait after its client hung up: 15,000 abandoned reads stalled the API."""
    import socket

    r = private_redis.client()
    register_ghost(r, "tiny")
    api, url = start_api(private_redis.url, tmp_path, LATENTD_DEFAULT_MODEL="tiny")
    try:
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}).json()["id"]

        def commands_in(seconds: float) -> int:
            before = r.info("stats")["total_commands_processed"]
            time.sleep(seconds)
            return int(r.info("stats")["total_commands_processed"]) - before - 2

        idle = commands_in(3)
        port = int(url.rpartition(":")[2])
        held = f"GET /v1/generations/{job_id}?wait=60 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(held)
        time.sleep(2)  # each notices within a second
        held = commands_in(3)
        assert held < idle + 20, (idle, held)  # 20 reads a second, each of several commands, before
        # Their answers were never sent: counted as 499s (nginx's "client closed request"), not 200s.
        metrics = HTTP.get(f"{url}/metrics").text
        assert 'route="/v1/generations/{id}",status="499"} 20.0' in metrics, metrics
    finally:
        api.stop()


def test_a_connection_slower_than_the_read_timeout_is_closed(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """A connection that sent nothing, or a head a line at a time, was held for good: 20,000 of
    them took every file descriptor the API had."""
    import socket

    r = private_redis.client()
    register_ghost(r, "tiny")
    api, url = start_api(private_redis.url, tmp_path, LATENTD_REQUEST_READ_TIMEOUT="2")
    port = int(url.rpartition(":")[2])
    try:
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}).json()["id"]
        body_due = b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        for sent in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", body_due):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(sent)
                started = time.monotonic()
                assert conn.recv(100) == b"", sent  # closed, unanswered
                assert 1.5 < time.monotonic() - started < 6, sent
        # Between requests, bytes that begin none (a bare CRLF) stopped the keep-alive timer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):
                answer += conn.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            conn.sendall(b"\r\n")
            assert conn.recv(100) == b""
        # A request read whole is not cut, however long its answer takes.
        held = HTTP.get(f"{url}/v1/generations/{job_id}?wait=4", timeout=10)
        assert held.status_code == 200 and held.elapsed.total_seconds() > 3.5
    finally:
        api.stop()


def test_a_model_whose_workers_are_gone_stays_in_the_metrics_while_its_jobs_wait(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    r = private_redis.client()
    register_ghost(r, "other")
    api, url = start_api(private_redis.url, tmp_path, LATENTD_DEFAULT_MODEL="tiny")
    try:
        assert HTTP.post(f"{url}/v1/generations", json={"prompt": "x", "model": "other"}).status_code == 202
        r.delete("latentd:worker:ghost")  # its heartbeat lapses
        text = HTTP.get(f"{url}/metrics").text
        assert 'latentd_workers{model="other"} 0.0' in text  # LatentdNoWorkers fires for it
        assert 'latentd_queue_depth{model="other"} 1.0' in text
    finally:
        api.stop()


def test_openai_route_tells_openais_clients_not_to_resend_an_accepted_job(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    # OpenAI's SDKs resend a request that got a 409, 429 or 5xx: each resend queued the job again.
    r = private_redis.client()
    register_ghost(r, "tiny")  # nothing runs the job: the wait runs out
    api, url = start_api(private_redis.url, tmp_path, LATENTD_DEFAULT_MODEL="tiny", LATENTD_SYNC_TIMEOUT="1")
    try:
        response = HTTP.post(
            f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64"}, timeout=30
        )
        assert response.status_code == 504 and response.json()["error"]["code"] == "wait_timeout"
        assert response.headers["x-should-retry"] == "false"
        assert r.llen("rq:queue:latentd:tiny") == 1
        refused = HTTP.post(f"{url}/v1/images/generations", json={"prompt": "x", "model": "nobody"})
        assert refused.status_code == 400 and "x-should-retry" not in refused.headers  # nothing accepted
    finally:
        api.stop()


def test_openai_route_says_to_poll_not_to_resend_when_redis_fails_during_its_wait(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    # Its 503 carried Retry-After beside x-should-retry: false: a client heeding the first queued
    # the job again, and the message said to retry, naming no job to poll.
    register_ghost(private_redis.client(), "tiny")
    api, url = start_api(private_redis.url, tmp_path, LATENTD_DEFAULT_MODEL="tiny", LATENTD_SYNC_TIMEOUT="30")
    answers: list[httpx.Response] = []
    try:
        waiting = threading.Thread(
            target=lambda: answers.append(
                HTTP.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64"}, timeout=60)
            )
        )
        waiting.start()
        time.sleep(1.5)  # accepted, and waiting
        private_redis.stop()
        waiting.join(timeout=45)
        (response,) = answers
        assert response.status_code == 503, response.text
        assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
        message = response.json()["error"]["message"]
        assert re.search(r"generation '([0-9a-f]{32})' goes on: poll /v1/generations/\1$", message), message
        assert "Traceback" not in api.output()
    finally:
        api.stop()


def test_openai_route_says_to_poll_not_to_resend_after_a_fault_of_its_own(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fault past the job's acceptance got the bare 500, which OpenAI's SDKs send again.
    from fastapi.testclient import TestClient

    from app.config import ApiSettings
    from app.main import create_app
    from app.serving import GenerationService

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(GenerationService, "wait", broken)
    register_ghost(redis_client, "tiny")
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), default_model="tiny")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
        assert response.status_code == 500 and response.headers["x-should-retry"] == "false"
        error = response.json()["error"]
        assert error["code"] == "internal_error" and "goes on: poll /v1/generations/" in error["message"]
        assert "a bug" not in response.text
        assert "latentd_internal_errors_total 1.0" in client.get("/metrics").text
    assert redis_client.llen("rq:queue:latentd:tiny") == 1  # the one job, which goes on


DIE_BEFORE_ENQUEUE = """
import os
import app.serving

async def die(*args, **kwargs):
    os._exit(9)  # killed between claiming the Idempotency-Key and enqueueing its job

app.serving.GenerationService._enqueue = die
"""


def test_an_idempotency_key_claimed_by_an_api_that_died_frees_itself(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    r = private_redis.client()
    register_ghost(r, "tiny")
    body, headers = {"prompt": "x", "steps": 1}, {"Idempotency-Key": "order-7"}
    dying, url = start_api(
        private_redis.url, tmp_path, "dying", PYTHONPATH=sitecustomize(tmp_path, DIE_BEFORE_ENQUEUE)
    )
    with pytest.raises(httpx.HTTPError):
        HTTP.post(f"{url}/v1/generations", json=body, headers=headers, timeout=10)
    assert dying.proc.wait(10) == 9
    api, url = start_api(private_redis.url, tmp_path)
    try:
        # Its claim stands only briefly; a replay then gets a job (it got 409 for a day).
        replay = HTTP.post(f"{url}/v1/generations", json=body, headers=headers, timeout=10)
        if replay.status_code == 409:
            assert replay.json()["error"]["code"] == "idempotency_conflict"
            replay = wait_until(
                lambda: (
                    (a := HTTP.post(f"{url}/v1/generations", json=body, headers=headers)).status_code == 202
                    and a
                ),
                15,
                what="the dead API's claim to lapse",
            )
        assert replay.status_code == 202, replay.text
        [claim] = r.keys("latentd:idempotency:*")
        assert r.ttl(claim) > 3600  # an accepted job holds its key as long as the job lives
        again = HTTP.post(f"{url}/v1/generations", json=body, headers=headers)
        assert again.json()["id"] == replay.json()["id"]
        assert r.llen("rq:queue:latentd:tiny") == 1
    finally:
        api.stop()


LOSE_THE_FIRST_ENQUEUE_REPLY = """
import redis
import app.serving

_rq_enqueue = app.serving.GenerationService._rq_enqueue
lost = []


async def rq_enqueue(self, *args, **kwargs):
    taken = await _rq_enqueue(self, *args, **kwargs)
    if not lost:
        lost.append(True)
        raise redis.TimeoutError("Timeout reading from socket")  # Redis took it; its reply was lost
    return taken


app.serving.GenerationService._rq_enqueue = rq_enqueue
"""


def test_a_replay_after_a_lost_enqueue_reply_gets_the_job_that_was_taken(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    # The submit let its Idempotency-Key go when the enqueue's reply did not come, though Redis had
    # taken the job (or took it on waking from a stall): the client's replay made a second job.
    r = private_redis.client()
    register_ghost(r, "tiny")
    body, headers = {"prompt": "x", "steps": 1}, {"Idempotency-Key": "order-8"}
    api, url = start_api(
        private_redis.url, tmp_path, PYTHONPATH=sitecustomize(tmp_path, LOSE_THE_FIRST_ENQUEUE_REPLY)
    )
    try:
        first = HTTP.post(f"{url}/v1/generations", json=body, headers=headers, timeout=10)
        assert first.status_code == 503, first.text
        replay = HTTP.post(f"{url}/v1/generations", json=body, headers=headers, timeout=10)
        assert replay.status_code == 202, replay.text
        assert r.lrange("rq:queue:latentd:tiny", 0, -1) == [replay.json()["id"].encode()]
    finally:
        api.stop()


def test_cli_generate_writes_the_images(service: Service, tmp_path: Path) -> None:
    env = base_env(service.url)
    proc = spawn(
        [
            "generate",
            "a blue square" + " and" * 80,  # longer than the model reads: the client is told
            "--url",
            service.url,
            "--out",
            str(tmp_path / "out"),
            "-n",
            "2",
            "--steps",
            "2",
            "--seed",
            "5",
            "--model",
            TINY_MODEL,
        ],
        env,
        tmp_path / "generate.log",
    )
    assert proc.proc.wait(60) == 0, proc.output()
    files = sorted((tmp_path / "out").glob("*.png"))
    assert len(files) == 2 and all(f.stat().st_size > 100 for f in files)
    assert "succeeded" in proc.output()
    assert "warning: prompt: " in proc.output() and "the model reads the first 75" in proc.output()


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--url", "http://127.0.0.1:1"], 1, "cannot talk to http://127.0.0.1:1: ConnectError"),
        (["--url", "localhost:8791"], 1, "cannot talk to localhost:8791"),
        (["--url", "http://[::1"], 1, "invalid URL 'http://[::1'"),
        (["--guidance-scale", "nan"], 2, "'nan' is not a finite number"),
        ([os.fsdecode(b"caf\xe9")], 2, "the prompt is not valid UTF-8 text"),
    ],
)
def test_cli_generate_answers_bad_input_in_one_line(args: list[str], code: int, says: str) -> None:
    if len(args) == 1:  # a prompt that is not text
        argv = ["generate", *args, "--url", "http://127.0.0.1:1"]
    else:
        argv = ["generate", "a red circle", *args]
    run = subprocess.run(
        [sys.executable, "-m", "latentd.cli", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert run.returncode == code, run.stderr
    assert says in run.stderr and "Traceback" not in run.stderr, run.stderr


class NotLatentd(http.server.BaseHTTPRequestHandler):
    """Some other web server, at the URL a user gave by mistake: a page for everything."""

    def _page(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>hello</html>")

    do_GET = do_POST = _page

    def log_message(self, *args: object) -> None:
        pass


def test_cli_generate_against_a_server_that_is_not_latentd_says_so() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotLatentd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        run = subprocess.run(
            [sys.executable, "-m", "latentd.cli", "generate", "x", "--url", url],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert run.returncode == 1, run.stderr
    assert "unexpected reply" in run.stderr and "text/html" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_ctrl_c_in_cli_generate_cancels_its_job(service: Service, tmp_path: Path) -> None:
    long = ["--steps", "150", "--width", "256", "--height", "256", "--model", TINY_MODEL]
    proc = spawn(
        ["generate", "a long one", "--url", service.url, *long], base_env(service.url), tmp_path / "g.log"
    )
    wait_until(lambda: "running [" in proc.output(), 60, what="the job running")
    job_id = proc.output().split("submitted ")[1].split()[0]
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(30) == 130, proc.output()
    assert f"interrupted: generation {job_id} canceled" in proc.output()
    assert "Traceback" not in proc.output()
    assert service.wait_terminal(job_id)["status"] == "canceled"


def test_client_sees_the_end_at_once_not_at_its_next_poll(service: Service, tmp_path: Path) -> None:
    # Its status reads are held (`?wait=`) up to `poll` seconds: a client that slept `poll`
    # between plain reads would take 20 s here, for a job that ends within a second or two.
    started = time.monotonic()
    body = {"prompt": "a red circle", "steps": 20, "seed": 1, "model": TINY_MODEL}
    paths = generate(service.url, body, tmp_path / "out", poll=20)
    assert len(paths) == 1 and paths[0].stat().st_size > 100
    assert time.monotonic() - started < 10


def test_the_worker_announces_each_ended_job_with_its_final_status(service: Service) -> None:
    """Long-polls wake on `Keys.ENDED`; the worker publishes it in the transaction that ends the
    job, so a waiter that re-reads on the message sees the end (else it waits for its re-read)."""
    from latentd.contract import Keys

    pubsub = service.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Keys.ENDED)
    try:
        ok = service.submit(steps=2)["id"]
        bad = service.submit(steps=40, width=96, height=96)["id"]  # seconds long: canceled before its end
        assert service.http.post(f"/v1/generations/{bad}/cancel").status_code in (200, 202)
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while {ok, bad} - seen.keys() and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message is not None:
                job_id = message["data"].decode()
                seen[job_id] = service.redis.hget(f"rq:job:{job_id}", "status").decode()
    finally:
        pubsub.close()
    assert seen.get(ok) == "finished" and seen.get(bad) in ("canceled", "stopped"), seen


def test_embedded_redis_is_persistent_and_never_evicts(tmp_path: Path) -> None:
    from latentd.embedded import start_redis

    proc, url = start_redis(tmp_path / "data")
    try:
        r = redis.Redis.from_url(url)
        assert r.config_get("appendonly")["appendonly"] == "yes"
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_that_may_evict_jobs_is_refused(private_redis: RedisServer, tmp_path: Path) -> None:
    r = private_redis.client()
    r.config_set("maxmemory-policy", "allkeys-lru")
    env = base_env(private_redis.url, LATENTD_MODEL=str(tmp_path / "unused"))
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    assert worker.proc.wait(120) == 4
    assert "noeviction" in worker.output()
    api = spawn(["api"], {**env, "LATENTD_PORT": str(free_port())}, tmp_path / "api.log")
    assert api.proc.wait(60) == 4
    assert "noeviction" in api.output() and "Traceback" not in api.output()


def test_a_redis_like_server_that_answers_config_without_the_policy_is_served() -> None:
    """Some Redis-compatible servers answer CONFIG GET with an empty map (none here to start):
    the API and the worker refused them for good, as "maxmemory-policy is 'None'"."""

    class AnswersNothing(redis.Redis):
        def config_get(self, *args: Any, **kwargs: Any) -> dict[str, str]:
            return {}

    check_eviction_policy(AnswersNothing())


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("api", "LATENTD_PORT", "0"),
        ("api", "LATENTD_LOG_LEVEL", "verbose"),
        ("worker", "LATENTD_LOG_LEVEL", "trace"),
        ("api", "LATENTD_REDIS_URL", "localhost:6379"),
        ("worker", "LATENTD_REDIS_URL", "localhost:6379"),
        ("worker", "LATENTD_DEVICE", "bogus"),
        ("worker", "LATENTD_HEARTBEAT_INTERVAL", "inf"),
        ("api", "LATENTD_SYNC_TIMEOUT", "nan"),
        ("api", "LATENTD_DEFAULT_SIZE", "2048"),  # over LATENTD_MAX_PIXELS
        ("api", "LATENTD_DEFAULT_SIZE", "65"),  # every request without a size would fail
        ("worker", "LATENTD_JOB_TTL", "60"),  # under LATENTD_RESULTS_TTL
        ("worker", "LATENTD_READY_FILE", "/proc/latentd.ready"),  # a traceback once the model was loaded
        ("worker", "LATENTD_MODEL", "/"),  # served as '', which no request can name
    ],
)
def test_bad_configuration_is_named_without_a_traceback(
    tmp_path: Path, command: str, variable: str, value: str
) -> None:
    proc = spawn([command], {**base_env("redis://127.0.0.1:1/0"), variable: value}, tmp_path / "out.log")
    assert proc.proc.wait(60) == 2, proc.output()
    assert f"invalid configuration: {variable}" in proc.output() and "Traceback" not in proc.output()


@pytest.mark.parametrize(
    ("settings", "values"),
    [
        ("api", {"job_timeout": 10**10}),  # every job failed: a batch's alarm overflowed a C int
        ("api", {"results_ttl": 10**16, "job_ttl": 10**16}),  # every job failed: Redis refused the expiry
        ("worker", {"torch_threads": 100_000}),  # the model "could not load", then a segfault
        ("worker", {"heartbeat_interval": 1e12}),  # its thread died: the worker stayed listed
        ("worker", {"heartbeat_interval": 1e-6}),  # 11,000 Redis calls a second, idle
        ("worker", {"shutdown_grace": 1e300}),  # the grace's timer died at SIGTERM
        ("worker", {"model_name": "m" * 201}),  # served, and no request could name it
    ],
)
def test_settings_past_what_works_are_refused(settings: str, values: dict[str, object]) -> None:
    from pydantic import ValidationError

    from app.config import ApiSettings
    from worker.config import WorkerSettings

    kind = ApiSettings if settings == "api" else WorkerSettings
    with pytest.raises(ValidationError):
        kind(**values)


def test_a_workers_bad_setting_is_named_before_torch_loads() -> None:
    """Loading torch and diffusers takes seconds; a typo in a setting is told before it."""
    script = "import sys; from latentd.cli import main; print(main(['worker']), 'torch' in sys.modules)"
    env = {**base_env("redis://127.0.0.1:1/0"), "LATENTD_DEVICE": "bogus"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert "invalid configuration: LATENTD_DEVICE" in done.stderr
    assert done.stdout.split() == ["2", "False"], done.stdout


def test_a_worker_stops_at_once_while_it_loads_and_says_ready_only_once_loaded(tmp_path: Path) -> None:
    """As a container's PID 1 a worker gets only the signals it handles, and it handled none until
    its model was loaded: a stop during a load waited out the whole stop grace. A ready file a
    killed worker left said ready before the model was loaded."""
    ready = tmp_path / "worker.ready"
    ready.write_text("w1")
    env = base_env(f"redis://127.0.0.1:{free_port()}/0", LATENTD_READY_FILE=str(ready))  # no Redis: it waits
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 30
        while "worker_starting" not in worker.output():
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.output()
            time.sleep(0.05)
        assert not ready.exists()
        worker.proc.send_signal(signal.SIGTERM)  # while torch loads, or while it waits for Redis
        assert worker.proc.wait(20) == 0, worker.output()
    finally:
        worker.stop()
    assert "Traceback" not in worker.output()


def error_answer(conn: Any) -> tuple[str, str]:
    """The status and error code of the one answer a socket gets before the server closes it."""
    reply = b""
    while chunk := conn.recv(65536):
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split()[1].decode(), json.loads(body)["error"]["code"]


def test_a_request_head_over_the_bound_is_refused_while_it_is_read(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """httptools read a head whole however long: one 100 MB header took the API 200 MB."""
    import socket

    from app.head_limit import MAX_HEAD_BYTES

    api, url = start_api(private_redis.url, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        large = HTTP.get(f"{url}/healthz", headers={"X-Large": "k" * (MAX_HEAD_BYTES // 2)})
        assert large.status_code == 200, large.text  # long, within the bound
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: ")
            try:  # four times the bound, and no end of the header: without a bound, no answer
                for _ in range(4 * MAX_HEAD_BYTES // 16384):
                    conn.sendall(b"k" * 16384)
            except OSError:
                pass  # closed on us: the answer is waiting
            assert error_answer(conn) == ("431", "headers_too_large")
        assert HTTP.get(f"{url}/healthz").status_code == 200  # and serves on
        # A head over the bound that comes in one read: it was parsed whole and served (200).
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            over = b"k" * (MAX_HEAD_BYTES + 1024)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Over: " + over + b"\r\n\r\n")
            assert error_answer(conn) == ("431", "headers_too_large")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:  # a WebSocket's, too
            upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + upgrade + b"X-Over: " + over + b"\r\n\r\n")
            assert error_answer(conn) == ("431", "headers_too_large")
        assert HTTP.get(f"{url}/healthz").status_code == 200
        assert "Traceback" not in api.output()  # uvicorn upgraded the refused WebSocket request, and raised
        # Pipelined requests that come in one read are not one head: every one is answered.
        many = 8 * MAX_HEAD_BYTES // 36
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * many)
            answers = b""
            while answers.count(b"HTTP/1.1 200 ") < many:
                chunk = conn.recv(1 << 20)
                assert chunk and b" 431 " not in answers, answers[-300:]
                answers += chunk
        # What HTTP itself cannot read is answered in the error envelope too, not in plain text.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")
            assert error_answer(conn) == ("400", "invalid_request")
    finally:
        api.stop()
    assert "Traceback" not in api.output()


def test_a_request_that_offers_another_protocol_is_answered_as_the_http_request_it_is(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Java's HttpClient offers `Upgrade: h2c` with every request to an http:// URL (so does `curl
    --http2`): the API answered such a submit as if it had no body (422), or, with its body sent
    apart, took the body for the next request (400). A WebSocket's offer got a bare 403."""
    import socket

    api, url = start_api(private_redis.url, tmp_path, LATENTD_REQUEST_READ_TIMEOUT="2")
    port = int(url.rsplit(":", 1)[1])

    def answers(*parts: bytes, count: int = 1, apart: float = 0.2) -> list[tuple[int, dict[str, Any]]]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            for part in parts:
                conn.sendall(part)
                time.sleep(apart)  # as a client that writes the head and the body in turn
            reply = b""
            while reply.count(b"HTTP/1.1 ") < count or not reply.endswith(b"}"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
        found = re.findall(rb"HTTP/1.1 (\d+) .*?\r\n\r\n(\{.*?\})(?=HTTP/|$)", reply, re.S)
        return [(int(status), json.loads(body)) for status, body in found]

    body = b'{"prompt": "a red circle", "model": "not-served"}'
    offer = (
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    )
    head = b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + offer
    sized = head + b"Content-Length: %d\r\n\r\n" % len(body)
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    read = (400, "model_unavailable", "model")  # the body was read: it names a model no worker serves
    try:
        for parts in ([sized + body], [sized, body], [chunked]):
            [(status, answer)] = answers(*parts)
            assert (status, answer["error"]["code"], answer["error"]["param"]) == read, (parts, answer)
        # The connection serves on: a request after it, in the same read, is answered too.
        then = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        assert [status for status, _ in answers(sized + body + then, count=2)] == [400, 200]
        # Only the offer goes: the headers Connection names stay, Content-Length among them (its
        # body was read as the next request), and a request that closes is answered (not a 400
        # for what followed it) (helper-46).
        for connection, after in ((b"Upgrade, Content-Length, Content-Type", [200]), (b"close, Upgrade", [])):
            named = sized.replace(b"Upgrade, HTTP2-Settings", connection)
            (status, answer), *rest = answers(named + body + then, count=2)
            assert (status, answer["error"]["code"], answer["error"]["param"]) == read, (connection, answer)
            assert [status for status, _ in rest] == after
        # Read again, its head keeps its read deadline: a body that comes past it is not waited for.
        assert answers(sized[:20], sized[20:], body, apart=0.5) == answers(sized + body)
        assert answers(sized[:20], sized[20:], body, apart=1.5) == []
        websocket = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        assert answers(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + websocket + b"\r\n") == [
            (200, {"status": "ok"})
        ]
    finally:
        api.stop()
    assert "Traceback" not in api.output() and "upgrade" not in api.output().lower()


def test_a_log_level_in_capitals_is_taken_and_an_empty_variable_is_unset() -> None:
    from latentd.settings import CommonSettings

    env = {"LATENTD_LOG_LEVEL": "WARNING", "LATENTD_REDIS_URL": ""}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        settings = CommonSettings()
    assert settings.log_level == "warning" and settings.redis_url is None  # `up` embeds its own Redis


def test_a_redis_that_refuses_writes_stops_the_worker_in_one_line(tmp_path: Path) -> None:
    """A read-only replica: the worker's first write failed with a traceback. (A full Redis is waited
    for: test_redis_outage.)"""
    port = free_port()
    replica = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--save", "", "--appendonly", "no",
         "--replicaof", "127.0.0.1", str(free_port())],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        worker = spawn(["worker"], base_env(f"redis://127.0.0.1:{port}/0"), tmp_path / "worker.log")
        assert worker.proc.wait(120) == 4, worker.output()
    finally:
        replica.terminate()
        replica.wait()
    assert "refuses writes" in worker.output() and "Traceback" not in worker.output()


def test_a_device_this_host_lacks_stops_the_worker_in_one_line(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    env = base_env(private_redis.url, LATENTD_DEVICE="cuda:7")  # no host here has eight GPUs
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    assert worker.proc.wait(120) == 3, worker.output()  # the model cannot load
    assert "LATENTD_DEVICE=cuda:7" in worker.output() and "Traceback" not in worker.output()


# A CUDA error in the worker's check of its model, as on a GPU whose context broke at start.
DEVICE_BREAKS_IN_THE_CHECK = """
from worker.pipeline import Runner

real = Runner.generate


def generate(self, payloads, *args, **kwargs):
    if payloads[0].job_id == "check":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return real(self, payloads, *args, **kwargs)


Runner.generate = generate
"""


def test_a_device_that_breaks_as_the_model_is_checked_exits_70(
    private_redis: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # It exited 3, "loads but cannot generate": a model that cannot serve, which supervisors that
    # restart a broken device's worker (on 70, as `latentd up` does after ready) leave down.
    env = base_env(
        private_redis.url,
        LATENTD_MODEL=str(tiny_model_dir),
        LATENTD_MODEL_NAME=TINY_MODEL,
        PYTHONPATH=sitecustomize(tmp_path, DEVICE_BREAKS_IN_THE_CHECK),
    )
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    assert worker.proc.wait(120) == 70, worker.output()
    assert "illegal memory access" in worker.output() and "Traceback" not in worker.output()
    assert private_redis.client().hget(Keys.MODELS_SEEN, TINY_MODEL) is None  # not "loading" for an hour


def test_sigterm_answers_held_reads_at_once_and_the_api_exits(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    # uvicorn waits for every open request before it stops: a `?wait=` read or the OpenAI route
    # held the API for up to 60 or 120 s after SIGTERM, past a container's stop grace, and the
    # clients then lost the connection. Now each answers with its job's state, and the API exits.
    register_ghost(private_redis.client(), TINY_MODEL)  # jobs are accepted, and nothing runs them
    api, url = start_api(private_redis.url, tmp_path)
    try:
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}).json()["id"]
        answers: dict[str, httpx.Response] = {}

        def hold(name: str, method: str, path: str, **kwargs: object) -> threading.Thread:
            def run() -> None:
                answers[name] = HTTP.request(method, f"{url}{path}", timeout=30, **kwargs)  # type: ignore[arg-type]

            thread = threading.Thread(target=run)
            thread.start()
            return thread

        threads = [
            hold("read", "GET", f"/v1/generations/{job_id}?wait=60"),
            hold("openai", "POST", "/v1/images/generations", json={"prompt": "y"}),
        ]
        time.sleep(1.5)  # both are held by now
        assert not answers
        signalled = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        assert api.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn >= 0.29 re-raises it
        assert time.monotonic() - signalled < 5, api.output()[-2000:]
        read = answers["read"]
        assert read.status_code == 200 and read.json()["status"] == "queued", read.text
        openai = answers["openai"]
        assert openai.status_code == 503, openai.text
        assert openai.json()["error"]["code"] == "service_unavailable"
        assert "stopping" in openai.json()["error"]["message"]
        assert openai.headers["x-should-retry"] == "false"  # its job was accepted and goes on
        assert private_redis.client().llen(f"rq:queue:latentd:{TINY_MODEL}") == 2
        assert "Traceback" not in api.output()
    finally:
        api.stop()


def test_the_api_signal_hook_leaves_an_ignored_signal_ignored_and_puts_back_only_its_own() -> None:
    # The hook answers held reads on SIGTERM and SIGINT, then hands the signal on. A process that
    # ignores one (nohup, a supervisor) must keep ignoring it; and after uvicorn's forced exit,
    # which puts back the handlers it found, the hook must not undo that.
    from types import SimpleNamespace

    from app.main import ending_held_reads_on_exit

    closed: list[bool] = []
    service: Any = SimpleNamespace(ended=SimpleNamespace(close=lambda: closed.append(True)))
    handed: list[int] = []

    def prior(signum: int, frame: object) -> None:
        handed.append(signum)

    def replacement(signum: int, frame: object) -> None:
        pass

    found = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, prior)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:

        async def hooked(replace: bool) -> None:
            with ending_held_reads_on_exit(service):
                assert signal.getsignal(signal.SIGTERM) is not prior
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)  # the close runs on the loop
                if replace:
                    signal.signal(signal.SIGTERM, replacement)

        asyncio.run(hooked(replace=False))
        assert closed == [True] and handed == [signal.SIGTERM]  # SIGINT stayed ignored
        assert signal.getsignal(signal.SIGTERM) is prior
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        asyncio.run(hooked(replace=True))
        assert signal.getsignal(signal.SIGTERM) is replacement
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)


def test_a_worker_serving_a_name_with_other_weights_than_a_live_one_says_so(
    private_redis: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A fine-tune on one host under the shared name: one seed, other images, depending on the worker.
    import torch

    from worker.pipeline import fingerprint, load_pipeline

    mine = fingerprint(load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tmp_path))
    r = private_redis.client()
    register_ghost(r, TINY_MODEL, name="same", weights=mine)
    register_ghost(r, TINY_MODEL, name="older")  # an earlier release: no fingerprint
    register_ghost(r, "another", name="elsewhere", weights="0" * 16)
    register_ghost(r, TINY_MODEL, name="tuned", weights="1" * 16)
    worker = start_worker(private_redis.url, tiny_model_dir, tmp_path)
    try:
        said = [line for line in worker.output().splitlines() if "model_weights_differ" in line]
        assert (
            len(said) == 1 and f"weights={mine}" in said[0] and "workers=tuned=1111111111111111" in said[0]
        ), said
        assert WorkerInfo.model_validate_json(r.get(Keys.worker("w1")) or b"").weights == mine
    finally:
        worker.stop()


def test_a_redis_that_turns_unsafe_after_the_api_started_makes_it_unready(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The policy was checked once, at start: an API started before its Redis, or whose Redis
    # restarted or failed over with another config, said ready against one that evicts jobs.
    from fastapi.testclient import TestClient

    from app.config import ApiSettings
    from app.main import create_app

    r = private_redis.client()
    with TestClient(create_app(ApiSettings(redis_url=private_redis.url))) as client:
        assert client.get("/readyz").status_code == 200
        r.config_set("maxmemory-policy", "allkeys-lru")
        unready = client.get("/readyz")
        assert unready.status_code == 503, unready.text
        assert "maxmemory-policy is 'allkeys-lru'" in unready.json()["error"]["message"]
        r.config_set("maxmemory-policy", "noeviction")
        assert client.get("/readyz").status_code == 200
    assert "redis_keeps_nothing" not in caplog.text  # this Redis writes its AOF
    r.config_set("appendonly", "no")
    with caplog.at_level("WARNING"), TestClient(create_app(ApiSettings(redis_url=private_redis.url))):
        pass
    assert "redis_keeps_nothing" in caplog.text  # a restart of it would lose every job
