"""`latentd up` (what `make run` runs): embedded Redis, a worker and the API, supervised together."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from latentd.embedded import free_port
from tests.conftest import base_env, spawn, wait_until

pytestmark = pytest.mark.integration


def test_up_serves_a_generation_and_stops_cleanly(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    env = base_env("", LATENTD_MODEL=str(tiny_model_dir), LATENTD_PORT=str(port), LATENTD_TORCH_THREADS="1")
    del env["LATENTD_REDIS_URL"]  # no Redis given: `up` starts its own
    up = spawn(["up", "--data-dir", str(tmp_path / "data")], env, tmp_path / "up.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def serving() -> bool:
            assert up.proc.poll() is None, up.output()[-3000:]
            try:
                return bool(httpx.get(f"{url}/v1/models", timeout=2).json()["data"])
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        wait_until(serving, 120, interval=0.5, what="latentd up serving")
        # Said once the worker has its model, so a quickstart user knows when to submit.
        wait_until(
            lambda: f"latentd up: ready: the worker serves model '{tiny_model_dir.name}'" in up.output(),
            60,
            what="the ready line",
        )
        job = httpx.post(
            f"{url}/v1/generations", json={"prompt": "a red circle on a blue background", "seed": 7}
        )
        assert job.status_code == 202
        view = wait_until(
            lambda: (
                (v := httpx.get(f"{url}/v1/generations/{job.json()['id']}").json())["status"] == "succeeded"
                and v
            ),
            60,
        )
        image = httpx.get(url + view["images"][0]["url"])
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
        wait_until(lambda: httpx.get(f"{url}/v1/models").status_code == 401, 30, what="keys required")
        authorized = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert authorized.status_code == 200
    finally:
        up.proc.send_signal(signal.SIGINT)
        code = up.proc.wait(90)
    assert code == 0, up.output()[-3000:]
    assert not (tmp_path / "data" / "redis" / "url").exists(), "the URL goes when `up` stops"
