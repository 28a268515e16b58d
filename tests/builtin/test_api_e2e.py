"""The built-in model through the whole service: what the API returns is the picture asked for,
judged from its pixels."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RedisServer, start_api, start_worker, wait_until
from worker.builtin.checker import judge
from worker.pipeline import BUILTIN_DIR

pytestmark = pytest.mark.integration


def test_a_red_circle_on_a_blue_background(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    worker = start_worker(
        server.url, BUILTIN_DIR, tmp_path, LATENTD_MODEL="builtin", LATENTD_MODEL_NAME="builtin"
    )
    api, url = start_api(server.url, tmp_path, LATENTD_DEFAULT_MODEL="builtin")
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            job = http.post(
                "/v1/generations",
                json={"prompt": "a red circle on a blue background", "seed": 7, "num_images": 4},
            )
            assert job.status_code == 202
            view = wait_until(
                lambda: (v := http.get(job.headers["location"]).json())["status"] == "succeeded" and v, 60
            )
            assert view["request"]["model"] == "builtin"
            seen = [
                judge(np.asarray(Image.open(io.BytesIO(http.get(image["url"]).content)).convert("RGB")))
                for image in view["images"]
            ]
            assert len(seen) == 4
            assert all((j.shape_colour, j.background_colour) == ("red", "blue") for j in seen), seen
            # Shape class is 86 % on the evaluation's seen pairs (model card): most, not all, are round.
            assert sum(j.shape == "circle" for j in seen) >= 3, seen
    finally:
        api.stop()
        worker.stop()
        server.stop()
