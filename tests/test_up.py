"""`latentd up` (what `make run` runs): embedded Redis, a worker and the API, supervised together."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from latentd.embedded import free_port
from tests.conftest import HTTP, ROOT, RedisServer, base_env, spawn, wait_until

pytestmark = pytest.mark.integration


def up_env(model_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = base_env(
        "", LATENTD_MODEL=str(model_dir), LATENTD_PORT=str(port), LATENTD_TORCH_THREADS="1", **extra
    )
    del env["LATENTD_REDIS_URL"]  # no Redis given: `up` starts its own
    return env


def processes_using(path: Path) -> list[str]:
    """Running processes that name `path` in their command line or environment, or work in it
    (redis-server rewrites its command line, but works in its data directory)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.name == str(os.getpid()):
                continue
            named = str(path).encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            if named or Path(os.readlink(proc / "cwd")).is_relative_to(path):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_up_serves_a_generation_and_stops_cleanly(tmp_path: Path, tiny_model_dir: Path, stop: int) -> None:
    port = free_port()
    env = up_env(tiny_model_dir, port)
    up = spawn(["up", "--data-dir", str(tmp_path / "data")], env, tmp_path / "up.log", new_session=True)
    url = f"http://127.0.0.1:{port}"
    job_id = ""
    try:

        def serving() -> bool:
            assert up.proc.poll() is None, up.output()[-3000:]
            try:
                return bool(HTTP.get(f"{url}/v1/models", timeout=2).json()["data"])
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        wait_until(serving, 120, interval=0.5, what="latentd up serving")
        # Said once the worker has its model, so a quickstart user knows when to submit.
        wait_until(
            lambda: f"latentd up: ready: the worker serves model '{tiny_model_dir.name}'" in up.output(),
            60,
            what="the ready line",
        )
        job = HTTP.post(
            f"{url}/v1/generations", json={"prompt": "a red circle on a blue background", "seed": 7}
        )
        assert job.status_code == 202
        view = wait_until(
            lambda: (
                (v := HTTP.get(f"{url}/v1/generations/{job.json()['id']}").json())["status"] == "succeeded"
                and v
            ),
            60,
        )
        image = HTTP.get(url + view["images"][0]["url"])
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "data" / "redis").is_dir()  # the embedded Redis keeps its AOF there

        # `latentd keys`, given no Redis, finds the embedded one on its free port.
        keys = subprocess.run(
            [
                sys.executable,
                "-m",
                "latentd.cli",
                "keys",
                "create",
                "my-app",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert keys.returncode == 0, keys.stderr
        assert "embedded Redis" in keys.stderr
        key = keys.stdout.strip()
        wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 401, 30, what="keys required")
        authorized = HTTP.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert authorized.status_code == 200

        # One `up` per data directory: a second one would run a second Redis on the same AOF.
        second = subprocess.run(
            [sys.executable, "-m", "latentd.cli", "up", "--data-dir", str(tmp_path / "data")],
            env=up_env(tiny_model_dir, free_port()), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1 and "another `latentd up`" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr

        # Stopped as a terminal stops it, with a job running: the signal reaches the whole
        # process group. The worker finishes the job before Redis goes.
        headers = {"Authorization": f"Bearer {key}"}
        job_id = HTTP.post(
            f"{url}/v1/generations",
            json={"prompt": "a long one", "steps": 40, "width": 128, "height": 128},  # about 8 s here
            headers=headers,
        ).json()["id"]
        wait_until(
            lambda: (
                HTTP.get(f"{url}/v1/generations/{job_id}", headers=headers).json()["progress"]["step"] > 0
            ),
            60,
            what="the job running",
        )
    finally:
        os.killpg(up.proc.pid, stop)
        code = up.proc.wait(120)
    assert code == 0, up.output()[-3000:]
    assert f"job_succeeded job_id={job_id}" in up.output(), up.output()[-3000:]
    assert not (tmp_path / "data" / "redis" / "url").exists(), "the URL goes when `up` stops"
    assert not processes_using(tmp_path / "data"), "`up` left a process behind"


def test_up_with_a_bad_setting_starts_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = up_env(tiny_model_dir, free_port(), LATENTD_MAX_BATCH_IMAGES="0")
    up = spawn(["up", "--data-dir", str(tmp_path / "data")], env, tmp_path / "up.log")
    assert up.proc.wait(60) == 2
    assert "LATENTD_MAX_BATCH_IMAGES" in up.output() and "Traceback" not in up.output()
    assert not processes_using(tmp_path / "data"), "a Redis was left running"
    assert not (tmp_path / "data" / "redis" / "url").exists()


def test_up_says_when_its_redis_port_is_taken(
    tmp_path: Path, tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    env = up_env(tiny_model_dir, free_port())
    args = ["up", "--data-dir", str(tmp_path / "data"), "--redis-port", str(redis_server.port)]
    up = spawn(args, env, tmp_path / "up.log")
    assert up.proc.wait(60) == 1, up.output()
    assert "Address already in use" in up.output() and "Traceback" not in up.output()
    assert not processes_using(tmp_path / "data")
    assert redis_server.client().ping()  # the Redis already there is untouched


@pytest.mark.parametrize("blocked", [".", "redis"], ids=["data-dir-a-file", "redis-dir-a-file"])
def test_up_says_when_its_data_dir_cannot_be_used(tmp_path: Path, tiny_model_dir: Path, blocked: str) -> None:
    # A file where the directory should be raised a traceback (two, the second from the cleanup).
    data = tmp_path / "data"
    if blocked != ".":
        data.mkdir()
    (data / blocked).write_text("")
    up = spawn(["up", "--data-dir", str(data)], up_env(tiny_model_dir, free_port()), tmp_path / "up.log")
    assert up.proc.wait(60) == 1, up.output()
    assert "cannot use" in up.output() and "Traceback" not in up.output()


def test_what_up_started_stops_if_up_is_killed(tmp_path: Path, tiny_model_dir: Path) -> None:
    up = spawn(
        ["up", "--data-dir", str(tmp_path / "data")], up_env(tiny_model_dir, free_port()), tmp_path / "up.log"
    )
    wait_until(lambda: "the worker is loading" in up.output(), 60, what="up to start its children")
    assert processes_using(tmp_path / "data")  # the embedded Redis
    up.proc.kill()  # the OOM killer, say: no chance to stop anything
    up.proc.wait()
    wait_until(lambda: not processes_using(tmp_path / "data"), 30, what="the children to stop")


def child_of_up(data_dir: Path, kind: str) -> int:
    """The pid of `up`'s `latentd KIND` child, found by the ready file its environment names; waits
    for it (`up` says it starts one a moment before the process is there)."""

    def find() -> int | None:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                started_by_up = str(data_dir).encode() in (proc / "environ").read_bytes()
                if started_by_up and (proc / "cmdline").read_bytes().endswith(
                    f"latentd.cli\0{kind}\0".encode()
                ):
                    return int(proc.name)
            except OSError:
                continue
        return None

    pid: int = wait_until(find, 30, what=f"a {kind} child of up")
    return pid


@pytest.mark.parametrize(
    ("kind", "stop", "code"), [("worker", signal.SIGTERM, 1), ("api", signal.SIGKILL, 137)]
)
def test_up_stops_when_a_child_ends_and_says_how(
    tmp_path: Path, tiny_model_dir: Path, kind: str, stop: int, code: int
) -> None:
    # A child that ends of its own is a failure (1, where 0 gave 128); one killed by signal N
    # gives 128 + N, as a shell reports it.
    data, port = tmp_path / "data", free_port()
    env = up_env(tiny_model_dir, port, LATENTD_HOST="127.0.0.3")
    up = spawn(["up", "--data-dir", str(data)], env, tmp_path / "up.log")
    wait_until(lambda: "latentd up: ready" in up.output(), 120, what="up ready")
    os.kill(child_of_up(data, kind), stop)  # a worker asked to stop, stops: exit status 0
    assert up.proc.wait(60) == code, up.output()[-2000:]
    assert f"API on http://127.0.0.3:{port} " in up.output()  # where it listens (it said 127.0.0.1)
    assert f"latentd up: {kind} exited with" in up.output()
    assert not processes_using(data)


def test_up_starts_again_a_worker_that_failed_after_serving(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A worker killed mid-job (the OOM killer; a CUDA error exits 70) stopped the whole stack.
    # It is started again, and its job runs again on the new one once its lease lapses.
    data, port = tmp_path / "data", free_port()
    env = up_env(tiny_model_dir, port, LATENTD_LEASE_SECONDS="2", LATENTD_HEARTBEAT_INTERVAL="0.5")
    up = spawn(["up", "--data-dir", str(data)], env, tmp_path / "up.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "latentd up: ready" in up.output(), 120, what="up ready")
        wait_until(lambda: HTTP.get(f"{url}/v1/models", timeout=2).status_code == 200, 60, what="the API")
        job_id = HTTP.post(
            f"{url}/v1/generations", json={"prompt": "a long one", "steps": 40, "width": 128, "height": 128}
        ).json()["id"]
        wait_until(
            lambda: HTTP.get(f"{url}/v1/generations/{job_id}").json()["progress"]["step"] > 0,
            60,
            what="the job running",
        )
        os.kill(child_of_up(data, "worker"), signal.SIGKILL)
        wait_until(lambda: up.output().count("latentd up: ready") == 2, 120, what="a second worker ready")
        assert "latentd up: worker exited with -9; starting another" in up.output()
        view = wait_until(
            lambda: (v := HTTP.get(f"{url}/v1/generations/{job_id}").json())["status"] == "succeeded" and v,
            120,
            what="the job run again",
        )
        assert view["attempts"] == 2
        # One that fails before it is ready (a model that no longer loads, say) stops all.
        os.kill(child_of_up(data, "worker"), signal.SIGKILL)
        wait_until(lambda: "starting another (2 of 3" in up.output(), 30, what="a third worker")
        os.kill(child_of_up(data, "worker"), signal.SIGKILL)
        assert up.proc.wait(60) == 137, up.output()[-3000:]
        assert up.output().count("latentd up: ready") == 2
        assert "latentd up: worker exited with -9; stopping" in up.output()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert not processes_using(data)


def test_up_whose_terminal_closes_still_stops_in_order(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A closed terminal (an ssh session dropped): SIGHUP, and every line written to it fails.
    data = tmp_path / "data"
    master, terminal = pty.openpty()
    up = subprocess.Popen(
        [sys.executable, "-m", "latentd.cli", "up", "--data-dir", str(data)],
        env=up_env(tiny_model_dir, free_port()), stdout=terminal, stderr=terminal, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        while b"latentd up: ready" not in seen:
            seen += os.read(master, 4096)
    finally:
        os.close(master)  # the terminal is gone: writes to it now fail with EIO
    os.killpg(up.pid, signal.SIGHUP)
    assert up.wait(60) == 0
    assert not (data / "redis" / "url").exists(), "the stop was cut short"
    assert not processes_using(data)


def test_up_whose_redis_is_full_as_it_starts_waits_for_room(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Its worker's mark of the load refused (maxmemory reached), the worker exited 4 before it was
    # ready, and `up` stopped everything. It waits for Redis to take writes, and says why.
    server = RedisServer(tmp_path / "redis")
    server.start()
    r = server.client()
    r.config_set("maxmemory", 1)  # noeviction: every write refused
    data, port = tmp_path / "data", free_port()
    env = {**up_env(tiny_model_dir, port), "LATENTD_REDIS_URL": server.url}
    up = spawn(["up", "--data-dir", str(data)], env, tmp_path / "up.log", new_session=True)
    try:
        wait_until(
            lambda: "OutOfMemoryError" in up.output() or up.proc.poll() is not None, 120, what="the wait"
        )
        assert up.proc.poll() is None, up.output()[-3000:]
        assert "redis_away" in up.output() and "latentd up: ready" not in up.output()
        r.config_set("maxmemory", 0)
        wait_until(lambda: "latentd up: ready" in up.output(), 120, what="up ready")
        os.killpg(up.proc.pid, signal.SIGINT)
        assert up.proc.wait(60) == 0, up.output()[-3000:]
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
        server.stop()
    assert "Traceback" not in up.output()
    assert not processes_using(data)
